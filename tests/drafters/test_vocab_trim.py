"""Draft-time vocabulary trimming (drafter.draft_vocab, drafters/vocab_trim.py): the trimmed drafter proposes
only kept tokens (-inf elsewhere) from a really smaller head, the trained drafter is untouched, and the decoder's
output is unchanged: greedy equals the target's greedy output, sampling matches the target's distribution."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conf.errors import DraftsmithError
from conf.schema import load_config
from conf.schema.drafter import MedusaConfig
from conf.schema.eval import TreeConfig
from data_gen.output import draft_vocab_counts, draft_vocab_view
from decoding.decoder import SpeculativeDecoder
from decoding.verify import SamplingRule
from drafters.base import Drafter
from drafters.lm_drafter import LMTreeDrafter
from drafters.medusa import MedusaDrafter
from drafters.registry import drafter_class
from drafters.target import Target, target_identity
from drafters.vocab_trim import ScatterHead, draft_vocab_size, most_frequent, trim_draft_vocab, trimmed_lm
from tests.export_util import noisy
from tests.sampling_util import PROMPT, V, exact_pairs, pvalue, sample_pairs, tiny_llama

OPTIONS = ["eagle1", "eagle3", "medusa", "hydra", "small", "pard", "kangaroo"]


class Recorder(Drafter):
    """Passes every call through to `inner` and keeps the logits `expand` returned."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        for a in ("name", "uses_features", "feature_source", "vocab_size", "max_depth"):
            if hasattr(inner, a):
                setattr(self, a, getattr(inner, a))

    def prepare(self, room, cuda_graphs=False):
        self.inner.prepare(room, cuda_graphs)

    def start(self, input_ids, features):
        self.inner.start(input_ids, features)

    def expand(self, tree, frontier):
        out = self.inner.expand(tree, frontier)
        self.seen.append(out)
        return out

    def commit(self, new_ids, new_features):
        self.inner.commit(new_ids, new_features)


def trained(option, target, seed=0):
    cfg = load_config([f"drafter={option}"] + (["drafter.exit_layer=1"] if option == "kangaroo" else []))
    torch.manual_seed(seed)
    return noisy(drafter_class(cfg.drafter.name).from_target(cfg.drafter, target), seed), cfg


def counts_for(vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 1000, (vocab,), generator=torch.Generator().manual_seed(seed))


def draft_heads(model) -> list[torch.Tensor]:
    """The weight each family's draft logits come from (after trimming: the kept rows only)."""
    fam = model.family
    if fam in ("eagle1", "kangaroo"):  # both draft through the target's LM head
        return [model.draft_head.weight]
    if fam == "eagle3":
        return [model.lm_head.weight]
    if fam == "medusa":
        return [h[-1].weight for h in model.medusa_head]
    if fam == "hydra":
        return [h.weight for h in model.hydra_lm_head]
    return [model.model.get_output_embeddings().weight]


@pytest.mark.parametrize("option", OPTIONS)
def test_greedy_output_unchanged_with_a_trimmed_vocab(tiny_target, option):
    """T = 0 with a quarter of the vocabulary: speculative output == the target's greedy output, every draft
    row is -inf exactly outside the kept ids, and the head computes only the kept rows."""
    if option == "kangaroo" and tiny_target.model.config.model_type == "gpt2":
        pytest.skip("kangaroo shares Llama-style decoder layers; GPT-2 has none (its own one-line refusal)")
    model, cfg = trained(option, tiny_target)
    Vt = tiny_target.vocab_size
    k = Vt // 4
    counts = counts_for(Vt)
    small = trim_draft_vocab(model, counts, k)
    keep = most_frequent(counts, k, among=model.draft_ids if option == "eagle3" else None)
    if option == "eagle3":  # its trained draft vocab is the target's here (the tiny vocab is under 32000)
        assert model.draft_vocab_size == Vt and small.draft_vocab_size == k
    assert all(w.shape[0] == k for w in draft_heads(small))
    rec = Recorder(small.as_drafter(tiny_target))
    cfg.eval.tree.kind, cfg.eval.tree.depth, cfg.eval.tree.top_k, cfg.eval.tree.total_tokens = "dynamic", 3, 3, 8
    dec = SpeculativeDecoder.from_config(tiny_target, rec, cfg.eval, 0.0)
    ids = torch.randint(0, Vt, (1, 9), generator=torch.Generator().manual_seed(1))
    out, stats = dec.generate(ids, 24, eos_ids=[], generator=None)
    ref, _ = dec.generate_autoregressive(ids, 24, eos_ids=[], generator=None)
    assert out.tolist() == ref.tolist()
    assert stats.cycles >= 1 and rec.seen
    want = torch.zeros(Vt, dtype=torch.bool)
    want[keep] = True
    for logits in rec.seen:
        assert logits.shape[-1] == Vt
        assert (torch.isfinite(logits) == want).all()


@pytest.mark.parametrize("option", OPTIONS)
def test_kept_logits_equal_the_full_heads_and_the_trained_drafter_is_untouched(llama_target, option):
    """On the kept ids the trimmed drafter gives the full drafter's logits (tolerance 1e-5: a K-row and a V-row
    matmul may block their sums differently), and trimming changes nothing in the trained drafter's state."""
    model, cfg = trained(option, llama_target, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    k = llama_target.vocab_size // 8
    small = trim_draft_vocab(model, counts_for(llama_target.vocab_size, 4), k)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    runs = []
    for m in (model, small):
        rec = Recorder(m.as_drafter(llama_target))
        cfg.eval.tree.kind, cfg.eval.tree.depth = "chain", 2
        dec = SpeculativeDecoder.from_config(llama_target, rec, cfg.eval, 0.0)
        dec.generate(torch.tensor([[5, 9, 14, 2, 7, 30]]), 3, eos_ids=[], generator=None)  # seen[0]: the same root
        runs.append(rec.seen[0])
    full, trimmed = runs
    kept = torch.isfinite(trimmed)
    assert int(kept[0, 0].sum()) == k
    torch.testing.assert_close(trimmed[kept], full[kept], rtol=1e-5, atol=1e-5)


def test_eagle3_keeps_the_most_frequent_of_its_trained_draft_vocab(llama_target):
    cfg = load_config(["drafter=eagle3", "drafter.draft_vocab_size=64"])
    counts = counts_for(llama_target.vocab_size, 5)
    model = drafter_class("eagle3").from_target(cfg.drafter, llama_target, token_counts=counts)
    other = counts_for(llama_target.vocab_size, 6)  # eval-time counts need not agree with training's
    small = trim_draft_vocab(model, other, 16)
    assert small.draft_vocab_size == 16 and model.draft_vocab_size == 64
    assert set(small.draft_ids.tolist()) <= set(model.draft_ids.tolist())
    assert small.draft_ids.tolist() == most_frequent(other, 16, among=model.draft_ids).tolist()
    rows = torch.searchsorted(model.draft_ids, small.draft_ids)
    assert torch.equal(small.lm_head.weight, model.lm_head.weight[rows])
    assert trim_draft_vocab(model, other, 64).draft_vocab_size == 64  # K >= V_d keeps the trained vocabulary


# --- T = 1: the statistical losslessness test of tests/decoding/test_decoder_sampling.py, with trimmed drafters ----
@pytest.fixture(scope="module")
def v5_target():
    return Target(tiny_llama(0, 14.0), None, name="tiny-v5")


KEEP2 = torch.tensor([5, 0, 4, 1, 0])  # counts: tokens 0 and 2 are kept


def test_sampling_is_lossless_with_trimmed_medusa_heads(v5_target):
    torch.manual_seed(2)
    heads = noisy(MedusaDrafter(MedusaConfig(num_heads=2), 16, V), 2)
    with torch.no_grad():
        for h in heads.medusa_head:
            h[-1].weight.mul_(20)  # peaked drafts: a trimmed head then proposes (and has rejected) real tokens
    small = trim_draft_vocab(heads, KEEP2, 2)
    dec = SpeculativeDecoder(v5_target, small.as_drafter(v5_target), TreeConfig(kind="chain", depth=2), 1.0)
    counts = sample_pairs(lambda g: dec.generate(PROMPT, 3, eos_ids=[], generator=g)[0].tolist(), 200)
    assert pvalue(counts, exact_pairs(v5_target, SamplingRule(temperature=1.0))) > 1e-3


def test_sampling_is_lossless_with_a_trimmed_small_lm(v5_target):
    lm = trimmed_lm(tiny_llama(3, 4.0), most_frequent(KEEP2, 2))
    assert lm.lm_head.weight.shape == (2, 16) and isinstance(lm.lm_head, ScatterHead)
    rule = SamplingRule(temperature=1.0, top_p=0.95)
    dec = SpeculativeDecoder(v5_target, LMTreeDrafter(lm, vocab_size=V),
                             TreeConfig(kind="dynamic", depth=2, top_k=2, total_tokens=4), 1.0, top_p=0.95)
    counts = sample_pairs(lambda g: dec.generate(PROMPT, 3, eos_ids=[], generator=g)[0].tolist(), 200)
    assert pvalue(counts, exact_pairs(v5_target, rule)) > 1e-3


# --- settings and their one-line errors -------------------------------------------------------------
def test_sizes_and_fractions():
    assert draft_vocab_size(None, 4096) is None
    assert draft_vocab_size(4096, 4096) is None and draft_vocab_size(1.0, 4096) is None
    assert draft_vocab_size(0.25, 4096) == 1024 and draft_vocab_size(0.3, 10) == 3
    assert draft_vocab_size(1, 4096) == 1 and draft_vocab_size(512, 4096) == 512
    with pytest.raises(DraftsmithError, match=r"draft_vocab=4097 is larger than the target vocabulary \(4096"):
        draft_vocab_size(4097, 4096)


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "0.0", "abc", "true"])
def test_bad_sizes_are_one_line_errors(bad):
    with pytest.raises(DraftsmithError, match="drafter.draft_vocab=.*token count.*fraction") as e:
        load_config(["drafter=medusa", f"drafter.draft_vocab={bad}"])
    assert "\n" not in str(e.value)


def test_bad_source_is_a_one_line_error():
    with pytest.raises(DraftsmithError, match="draft_vocab_source='web': use data .* or generated"):
        load_config(["drafter=hydra", "drafter.draft_vocab_source=web"])


def fake_data_gen(folder, target, regenerate: bool):
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"target": target_identity(target),
                                                  "data": {"regenerate": regenerate}}))
    np.save(folder / "token_counts.npy", np.arange(target.vocab_size, dtype=np.int64))


def test_counts_sources_and_their_errors(llama_target, tmp_path):
    with pytest.raises(DraftsmithError, match="needs data_gen's token counts, but .* has no finished data_gen"):
        draft_vocab_counts(tmp_path / "none", "data", llama_target)
    fake_data_gen(tmp_path / "rendered" / "data_gen", llama_target, regenerate=False)
    fake_data_gen(tmp_path / "regen", llama_target, regenerate=True)
    counts = draft_vocab_counts(tmp_path / "rendered", "data", llama_target)  # a run dir is accepted
    assert counts.tolist() == list(range(llama_target.vocab_size))
    with pytest.raises(DraftsmithError, match="source=generated counts the target's own answers, but data_gen .*"
                                              "data.regenerate=false"):
        draft_vocab_counts(tmp_path / "rendered", "generated", llama_target)
    assert draft_vocab_counts(tmp_path / "regen", "generated", llama_target).shape == (llama_target.vocab_size,)


def test_view_reads_the_configured_counts(llama_target, cfg_for, tmp_path):
    model, _ = trained("hydra", llama_target)
    fake_data_gen(tmp_path / "regen", llama_target, regenerate=True)
    cfg = cfg_for("drafter=hydra", "drafter.draft_vocab=0.125", "drafter.draft_vocab_source=generated",
                  f"drafter.draft_vocab_counts={tmp_path / 'regen'}")
    small = draft_vocab_view(cfg, model, llama_target)
    k = llama_target.vocab_size // 8
    top = torch.arange(llama_target.vocab_size - k, llama_target.vocab_size)  # counts = arange: the last ids
    assert all(torch.equal(h.ids, top) for h in small.hydra_lm_head)
    assert draft_vocab_view(cfg_for("drafter=hydra"), model, llama_target) is model
    with pytest.raises(DraftsmithError, match="no finished data_gen output"):  # this run has no data_gen
        draft_vocab_view(cfg_for("drafter=hydra", "drafter.draft_vocab=8"), model, llama_target)


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_eagle3_exports_its_trimmed_draft_vocab(llama_target, tmp_path, fmt):
    """The formats with a draft vocabulary (d2t / t2d) carry the trimmed one: the folder passes the format
    check and reloads as an EAGLE-3 drafter over exactly the kept ids, with the kept rows of the head."""
    from export.formats import ExportContext, check_format, load_exported_model, write_export

    model, _ = trained("eagle3", llama_target)
    small = trim_draft_vocab(model, counts_for(llama_target.vocab_size, 7), 40)
    write_export(small, llama_target, fmt, tmp_path, ExportContext(dtype=torch.float32, target_ref="org/target"))
    assert check_format(tmp_path, fmt) == []
    back = load_exported_model(tmp_path, llama_target)
    assert back.draft_vocab_size == 40 and torch.equal(back.draft_ids, small.draft_ids)
    assert torch.equal(back.lm_head.weight, small.lm_head.weight)
    assert model.draft_vocab_size == llama_target.vocab_size  # the trained drafter keeps its full vocabulary


def test_eagle1_exports_its_trimmed_vocab_as_sglangs_token_map(llama_target, tmp_path):
    """EAGLE-1 drafts through the target's LM head, so SGLang takes its reduced vocabulary as an FR-Spec token
    map (--speculative-token-map): the folder has hot_token_ids.pt with the kept ids, the README passes it,
    the weights are the untrimmed drafter's, and the reload drafts over exactly those ids (round trip checked
    by the export stage's own verification)."""
    from export.formats import ExportContext, check_format, load_exported_model, write_export
    from export.stage import verify_export

    model, cfg = trained("eagle1", llama_target)
    small = trim_draft_vocab(model, counts_for(llama_target.vocab_size, 8), 50)
    write_export(small, llama_target, "sglang", tmp_path, ExportContext(dtype=torch.bfloat16, target_ref="org/t"))
    assert check_format(tmp_path, "sglang") == []
    assert torch.load(tmp_path / "hot_token_ids.pt") == small.draft_head.ids.tolist()
    assert '--speculative-token-map "$DRAFT/hot_token_ids.pt"' in (tmp_path / "README.md").read_text()
    back = load_exported_model(tmp_path, llama_target)
    assert torch.equal(back.draft_head.ids, small.draft_head.ids) and back.draft_head.weight.shape[0] == 50
    assert verify_export(small, llama_target, tmp_path, "sglang", torch.bfloat16, cfg.eval.tree, 0, 1)["violations"] == []
    torch.save([3, 3, 9], tmp_path / "hot_token_ids.pt")
    assert check_format(tmp_path, "sglang") == [
        f"hot_token_ids.pt: must be a torch.save'd list of distinct increasing token ids in [0, {llama_target.vocab_size})"]
