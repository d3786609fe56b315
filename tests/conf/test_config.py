"""Every config group composes; misspelt keys fail with Hydra's error; train.py dispatches stages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conf.errors import DraftsmithError
from conf.schema import CONF_DIR, PROJECT_ROOT, Config, load_config

GROUPS = ["target", "data", "drafter", "objective", "deepspeed", "eval", "export", "experiment", "pretrain"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = load_config([f"{group}={option}"])
    assert isinstance(cfg, Config)
    assert cfg.drafter.name and cfg.objective.name


def test_groups_exist():
    for g in GROUPS:
        assert _options(g), f"conf/{g}/ has no options"


def test_drafter_variants_map_to_their_schema():
    assert load_config(["drafter=medusa2"]).drafter.joint is True
    hp = load_config(["drafter=hydra_pp"]).drafter
    assert (hp.name, hp.mlp_layers, hp.prefix_layer, hp.teacher_loss) == ("hydra", 4, True, True)
    e3 = load_config([]).drafter
    assert (e3.name, e3.ttt_steps, e3.step_decay) == ("eagle3", 7, 0.8)


@pytest.mark.parametrize("override,key", [("train.lr_x=1", "lr_x"), ("drafter.num_heads=3", "num_heads"),
                                          ("data.sorce=jsonl", "sorce")])
def test_misspelt_key_fails_clearly(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        load_config([override])
    assert f"Key '{key}' not in" in str(e.value.__cause__ or e.value)


def test_experiment_smoke_caps_budgets():
    cfg = load_config(["experiment=smoke"])
    assert cfg.data.max_conversations == 8 and cfg.train.max_steps == 2 and cfg.run.name == "smoke"


@pytest.mark.parametrize("overrides,message", [
    (["objective=gto", "objective.eta=0"], "objective.eta=0.0 must be > 0 (paper: 1)"),
    (["objective=griffin", "objective.topk_weight=-1"], "objective.topk_weight=-1.0 must be >= 0 (0 = no top-K term)"),
    (["objective=on_policy", "objective.rollout=both"], "objective.rollout='both': use drafter (DistillSpec: the"),
    (["drafter=eagle3", "drafter.step_decay=0"], "drafter.step_decay=0.0 must be > 0 (official: 0.8)"),
    (["drafter=eagle1", "drafter.num_layers=0"], "drafter.num_layers=0: eagle1 needs at least 1 decoder layer"),
    (["drafter=medusa", "drafter.num_heads=0"], "medusa needs num_heads >= 1 and num_layers >= 0, got 0 and 1"),
    (["drafter=hydra", "drafter.mlp_layers=0"], "hydra needs num_heads >= 1 and mlp_layers >= 1, got 4 and 0"),
    # a family's own check() runs the draft-vocabulary checks every family shares
    (["drafter=eagle3", "drafter.draft_vocab=0"], "drafter.draft_vocab=0: give a token count"),
    (["drafter=pard", "drafter.draft_vocab_source=web"], "drafter.draft_vocab_source='web': use data"),
    (["drafter=kangaroo", "drafter.draft_vocab=2.0"], "drafter.draft_vocab=2.0: give a token count"),
    (["pretrain.num_heads=0"], "pretrain.num_heads must be >= 1 (got 0)"),
    (["export.check_max_new_tokens=0"], "export.check_prompts must be >= 0 and export.check_max_new_tokens >= 1"),
    (["data.split=test"], "data.split='test' is not a ShareGPT split: use train, heldout or all"),
    (["data.max_conversations=0"], "data.max_conversations=0: give a positive number, or null for all"),
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"],
     "deepspeed.offload_optimizer=true needs deepspeed.zero_stage>=1"),
    (["train.grad_accum=0"], "train.micro_batch_size=4 and train.grad_accum=0 must both be >= 1"),
    (["train.betas=[0.9]"], "train.betas=[0.9] must be two numbers, e.g. [0.9,0.95]"),
    (["train.max_steps=0"], "train.max_steps=0 must be >= 1 (or null to use train.epochs)"),
    (["train.epochs=0"], "train.epochs=0.0 must be > 0"),
    (["train.attention=eager"], "train.attention='eager': use one of auto, flex, sdpa (auto = flex on CUDA, sdpa "
                                "elsewhere)"),
    # one rule for the delayed trunk of both branching trees: shorter than eval.tree.depth
    (["eval.tree.delay=5"], "eval.tree.delay=5 must be < eval.tree.depth=5 (the trunk is a single path: the tree "
                            "branches below it"),
    (["eval.tree.kind=static", "eval.tree.paths=[[0],[1]]", "eval.tree.delay=400"],
     "eval.tree.delay=400 must be < eval.tree.depth=5 (the trunk is a single path: the tree branches below it"),
])
def test_the_schema_rejects_bad_values_while_the_config_is_built(overrides, message):
    """Ranges and choices live in the schema's __post_init__ (conf/schema/*.py), for the typed groups and for
    the drafter/objective groups whose schema the YAML picks alike: one line, before any stage runs."""
    with pytest.raises(DraftsmithError) as e:
        load_config(overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_train_attention_choices_compose():
    """train.attention: auto by default (flex on CUDA, sdpa elsewhere: drafters.layers.resolve_attention), and
    each choice as given."""
    assert load_config([]).train.attention == "auto"
    assert [load_config([f"train.attention={a}"]).train.attention for a in ("flex", "sdpa")] == ["flex", "sdpa"]


def test_epochs_are_not_checked_when_max_steps_counts():
    assert load_config(["train.epochs=0", "train.max_steps=5"]).train.max_steps == 5


def test_unknown_stage_is_one_clear_error():
    sys.path.insert(0, str(PROJECT_ROOT))
    import train

    cfg = load_config(["stage=nope"])
    with pytest.raises(DraftsmithError, match="unknown stage 'nope': choose from target_pretrain, data_gen"):
        train.run_stages(cfg)


def test_local_rank_flag_is_absorbed(monkeypatch):
    import train

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert train._absorb_local_rank(["train.py", "--local_rank=3", "stage=train"]) == ["train.py", "stage=train"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"


def test_help_lists_groups():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, check=True).stdout
    for g in GROUPS:
        assert f"\n{g}: " in out
    assert "eagle3" in out and "zero2" in out


def test_cli_bad_stage_prints_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(Path(PROJECT_ROOT) / "train.py"), "stage=nope",
                        f"run.root={tmp_path}"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown stage 'nope': choose from target_pretrain, data_gen, drafter_pretrain, train, eval, export, plan"]


def _cli(tmp_path, *overrides):
    return subprocess.run([sys.executable, str(Path(PROJECT_ROOT) / "train.py"), *overrides, f"run.root={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overrides,line", [
    (["drafter=eagel3"], "error: unknown drafter 'eagel3': choose one of dflash, eagle1, eagle3, hydra, hydra_pp, "
                         "kangaroo, medusa, medusa2, ngram, oracle, pard, small, target"),
    (["objective=gtoo"], "error: unknown objective 'gtoo': choose one of adaspec, coral, griffin, gto, hass, "
                         "on_policy, token"),
    (["export=sglng"], "error: unknown export 'sglng': choose one of dflash, hf, medusa, sglang, vllm"),
    (["experiment=gpu_dem"], "error: unknown experiment 'gpu_dem': choose one of demo, fastdraft, full, gpu_demo, "
                             "smoke"),
    (["pretrain=gpu_dem"], "error: unknown pretrain 'gpu_dem': choose one of cpu, gpu, gpu_demo"),
    (["train.stepz=3"], "error: unknown setting train.stepz (TrainConfig has no key 'stepz'; did you mean "
                        "train.max_steps?): check the spelling, or see `python train.py --help`"),
    (["drafter=medusa", "drafter.num_head=3"], "error: unknown setting drafter.num_head (MedusaConfig has no key "
                                               "'num_head'; did you mean drafter.num_heads?): check the spelling, or "
                                               "see `python train.py --help`"),
    (["train.max_steps=abc"], "error: train.max_steps: Value 'abc' of type 'str' could not be converted to "
                              "Integer"),
    (["-m", "drafter=eagle3,medusa,eagel3", "stage=eval"], "error: unknown drafter 'eagel3': choose one of dflash, "
                                                           "eagle1, eagle3, hydra, hydra_pp, kangaroo, medusa, medusa2, "
                                                           "ngram, oracle, pard, small, target"),
])
def test_cli_bad_names_and_keys_print_one_line(tmp_path, overrides, line):
    """Hydra's own report of these is five to twenty lines (options, the search path, HYDRA_FULL_ERROR):
    train.py composes the command's overrides first and says what is wrong in one line, before any stage."""
    r = _cli(tmp_path, *overrides)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [line]
    assert not any(tmp_path.iterdir())  # nothing written: no Hydra output folder either


def test_valid_commands_pass_the_override_check():
    """The check before Hydra stops only what Hydra would refuse: Hydra's own groups and keys, appended and
    deleted keys, sweeps it expands itself (glob) and its flags pass through."""
    from conf.cli import override_error

    for argv in (["hydra/job_logging=disabled", "hydra.run.dir=/tmp/x"], ["+train.foo=1"], ["stages=[train,eval]"],
                 ["-m", "drafter=glob(*)"], ["-m", "train.lr=range(1,3)"], ["--cfg", "job", "drafter=eagel3"],
                 ["experiment=smoke", "drafter=medusa", "drafter.num_heads=3"]):
        assert override_error(argv) is None, argv
    assert override_error(["-m", "train.lr=0.1,0.2", "train.max_steps=1,x"]) == (
        "train.max_steps: Value 'x' of type 'str' could not be converted to Integer")
