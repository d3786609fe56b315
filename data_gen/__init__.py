"""Prompt sources, chat templating and loss masks, regeneration by the target, caches, vocab statistics.

    python train.py stage=data_gen experiment=smoke          # data_gen/stage.py: run(cfg) -> DataGenResult

What the train stage uses (data_gen/output.py, data_gen/cache.py):
    check_same_target(data_dir, target)   # DraftsmithError when the data was made with another target
    load_dataset_dir(data_dir)            # datasets.Dataset: input_ids, loss_mask, conv_id, conv_index, ...
    load_token_counts(data_dir)           # [V] int64 assistant-token counts (reduced draft vocabularies)
    CachedFeatures(data_dir)[row]         # features, last_hidden, top-k logits (when data_gen cached them)
"""
