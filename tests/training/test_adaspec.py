"""AdaSPEC: the kept fraction is exact with deterministic ties, the kept tokens are those with the largest
KL(p||q_draft) - KL(p||q_ref), only they get gradient, the reference is frozen and loaded with clear errors,
and training through the stage lowers the loss.

    python -m pytest -q tests/training/test_adaspec.py
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conf.errors import DraftsmithError
from drafters import losses as L
from drafters.base import TargetSignal
from tests.train_fixtures import (
    ROOT,
    base_overrides,
    child_env,
    final_weights,
    read_metrics,
    write_data_gen,
)
from training.adaspec import AdaSPECObjective, load_reference, select_learnable, token_forward_kl


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4, 0.5, 0.7, 1.0])
def test_kept_count_is_exactly_the_fraction(fraction):
    g = torch.Generator().manual_seed(0)
    for n in range(1, 41):
        keep = select_learnable(torch.randn(n, generator=g), fraction)
        assert keep.dtype == torch.bool and int(keep.sum()) == math.ceil(fraction * n - 1e-9)
    assert int(select_learnable(torch.randn(10), 0.4).sum()) == 4  # 0.4 of 10 is 4, not ceil(4.000...1) = 5
    assert int(select_learnable(torch.randn(10), 0.7).sum()) == 7
    assert select_learnable(torch.zeros(0), 0.4).numel() == 0


def test_selected_are_the_largest_gaps_and_ties_go_to_earlier_tokens():
    delta = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, 0.3])
    assert select_learnable(delta, 0.5).tolist() == [True, False, True, False, True, False]  # 5, 2, then the first 0.3
    assert select_learnable(delta, 0.3).tolist() == [False, False, True, False, True, False]  # ceil(1.8) = 2
    assert select_learnable(torch.ones(5), 0.4).tolist() == [True, True, False, False, False]
    assert select_learnable(delta, 1.0).all()


def test_token_kl_is_forward_kl_per_token():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    per = token_forward_kl(q, p)
    assert per.shape == (7,) and (per >= 0).all()
    assert per.mean().item() == pytest.approx(L.forward_kl(q, p).item(), rel=1e-6)
    assert per[3].item() == pytest.approx(L.forward_kl(q[3:4], p[3:4]).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# The objective on a hand-built batch
# --------------------------------------------------------------------------------------------------
class FixedLM(nn.Module):
    """An 'LM' whose logits are a tensor (a parameter when trainable), whatever the input."""

    def __init__(self, logits: torch.Tensor, trainable: bool):
        super().__init__()
        self.logits = nn.Parameter(logits.clone(), requires_grad=trainable)

    def forward(self, input_ids=None, attention_mask=None):
        return SimpleNamespace(logits=self.logits)


def _hand_built(draft_peaks, ref_peaks, keep_fraction):
    """One row of 6 tokens, slots 1..5 assistant (5 trained positions t = 0..4), 4-token vocabulary. The target is
    uniform everywhere; draft and reference put `peak` extra logit on token 0 at position t, so
    KL(p || q) grows with the peak and dL = KL(peak_draft) - KL(peak_ref)."""
    V, T = 4, 6

    def logits(peaks):
        x = torch.zeros(1, T, V)
        for t, a in enumerate(peaks):
            x[0, t, 0] = a
        return x

    signal = TargetSignal(input_ids=torch.arange(T)[None], attention_mask=torch.ones(1, T, dtype=torch.long),
                          loss_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]), vocab_size=V,
                          _logits=torch.zeros(1, T, V))
    obj = AdaSPECObjective.__new__(AdaSPECObjective)  # skip loading a reference folder: hand it the LM
    obj.keep_fraction = keep_fraction
    obj.reference = FixedLM(logits(ref_peaks), trainable=False)
    drafter = SimpleNamespace(model=FixedLM(logits(draft_peaks), trainable=True))
    return obj, drafter, signal


def test_the_largest_gap_tokens_are_kept_and_only_they_get_gradient():
    draft = [0.0, 3.0, 1.0, 2.0, 3.0]
    obj, drafter, signal = _hand_built(draft, [0.0] * 5, keep_fraction=0.4)  # reference = target: dL = KL_draft
    loss, metrics = obj(drafter, signal)
    kl = token_forward_kl(drafter.model.logits[0, :5].detach(), torch.zeros(5, 4))
    assert kl.argsort(descending=True)[:2].sort().values.tolist() == [1, 4]
    assert loss.item() == pytest.approx(kl[[1, 4]].mean().item(), rel=1e-6)
    assert metrics["kept"] == pytest.approx(0.4) and metrics["fkl_all"] == pytest.approx(kl.mean().item(), rel=1e-6)
    assert metrics["loss/forward_kl"] == pytest.approx(loss.item()) and metrics["fkl_ref"] == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    moved = drafter.model.logits.grad[0].abs().sum(-1) > 0
    assert moved.tolist() == [False, True, False, False, True, False]
    # the reference changes the choice: where it is as far from p as the drafter, the gap is 0 there
    obj, drafter, signal = _hand_built(draft, [0.0, 3.0, 0.0, 0.0, 0.0], keep_fraction=0.4)
    obj(drafter, signal)[0].backward()
    assert (drafter.model.logits.grad[0].abs().sum(-1) > 0).tolist() == [False, False, False, True, True, False]
    # a tie (positions 1 and 4 both have the top gap) with room for one: the earlier token
    obj, drafter, signal = _hand_built(draft, [0.0] * 5, keep_fraction=0.2)
    obj(drafter, signal)[0].backward()
    assert (drafter.model.logits.grad[0].abs().sum(-1) > 0).tolist() == [False, True, False, False, False, False]
    assert obj.reference.logits.grad is None  # frozen


# --------------------------------------------------------------------------------------------------
# The reference and config errors
# --------------------------------------------------------------------------------------------------
def test_reference_errors_name_the_fix(tmp_path, llama_target):
    fix = r"train one first: python train.py stage=train drafter=small objective=token run.name=<ref>, then set " \
          r"objective.reference=runs/<ref>/train/final"
    with pytest.raises(DraftsmithError, match=r"^objective=adaspec needs objective.reference \(a trained small "
                                              r"drafter folder\): " + fix.replace("(", r"\(")):
        load_reference(None, llama_target)
    with pytest.raises(DraftsmithError, match=rf"^objective.reference='{tmp_path}/nope' does not exist: {fix}"):
        load_reference(str(tmp_path / "nope"), llama_target)
    other = tmp_path / "medusa-folder"
    other.mkdir()
    (other / "drafter_config.json").write_text(json.dumps({"family": "medusa"}))
    with pytest.raises(DraftsmithError, match="holds a 'medusa' drafter, not 'small'"):
        load_reference(str(other), llama_target)


@pytest.mark.parametrize("overrides,message", [
    (["objective.keep_fraction=0"], r"objective.keep_fraction=0.0 must be in \(0, 1\] \(the paper uses 0.4\)"),
    (["drafter=medusa"], r"drafter=medusa: use drafter=small"),
])
def test_config_errors(cfg_for, llama_target, overrides, message):
    from training.objectives import build_objective

    with pytest.raises(DraftsmithError, match=message):
        build_objective(cfg_for("drafter=small", "objective=adaspec", "objective.reference=x", *overrides),
                        llama_target)


def test_yaml_default_is_the_papers_fraction(cfg_for):
    o = cfg_for("objective=adaspec").objective
    assert (o.name, o.keep_fraction, o.reference) == ("adaspec", 0.4, None)


# --------------------------------------------------------------------------------------------------
# Training through the stage
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def reference(tmp_path, tiny_target_dir, llama_target):
    """A reference drafter: 6 steps of objective=token (forward KL) on the tiny Llama; its train/final folder."""
    from conf.schema import load_config
    from training.stage import train

    root = tmp_path / "runs"
    write_data_gen(root / "ref", llama_target, n_rows=16)
    cfg = load_config(base_overrides(tiny_target_dir("llama"), root, "ref") + [
        "drafter=small", "train.max_steps=6", "train.lr=0.01"])
    return train(cfg, target=llama_target)["final_dir"]


def test_adaspec_trains_and_its_loss_falls(tmp_path, tiny_target_dir, llama_target, reference):
    from conf.schema import load_config
    from training.stage import train

    ref_before = final_weights(reference)
    root = tmp_path / "runs"
    write_data_gen(root / "ada", llama_target, n_rows=8)  # 4 held out, 4 trained: one micro-batch, every step
    cfg = load_config(base_overrides(tiny_target_dir("llama"), root, "ada") + [
        "drafter=small", "objective=adaspec", f"objective.reference={reference}", "train.max_steps=12",
        "train.micro_batch_size=4", "train.lr=0.01", "train.log_every=1", "train.eval_every=0"])
    res = train(cfg, target=llama_target)
    logged = [x for x in read_metrics(Path(res["metrics"])) if x["kind"] == "train"]
    first, last = logged[0], logged[-1]
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert last["fkl_all"] < first["fkl_all"]
    assert all(0.4 <= x["kept"] <= 0.42 for x in logged)  # ceil(0.4 N) of the micro-batch's N (> 50) tokens
    # the reference is neither trained nor saved with the drafter
    assert all(torch.equal(ref_before[k], v) for k, v in final_weights(reference).items())
    assert set(final_weights(res)) == set(ref_before)  # the drafter's own tensors only
    assert res["eval"]["fkl_all"] > 0


@pytest.mark.slow
def test_cli_trains_adaspec(tmp_path, tiny_target_dir, llama_target, reference):
    """`python train.py stage=train drafter=small objective=adaspec objective.reference=...`"""
    write_data_gen(tmp_path / "runs" / "smoke", llama_target, n_rows=12)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=train", "experiment=smoke", "drafter=small",
                        "objective=adaspec", f"objective.reference={reference}",
                        f"target.path={tiny_target_dir('llama')}", f"run.root={tmp_path / 'runs'}", "run.device=cpu"],
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "smoke" / "train"
    assert (out / "final" / "model.safetensors").exists()
    assert [x["step"] for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "train"] == [1, 2]
    missing = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=train", "experiment=smoke",
                              "drafter=small", "objective=adaspec", f"target.path={tiny_target_dir('llama')}",
                              f"run.root={tmp_path / 'runs'}", "run.device=cpu"],
                             cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: objective=adaspec needs objective.reference")
