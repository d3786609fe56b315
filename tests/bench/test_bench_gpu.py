"""The GPU bench's pieces, on the CPU with tiny shapes: targets built on their device, the memory floor's
byte count, datasheet lookup, the EAGLE-3 FLOP formula (checked against torch's FLOP counter), the
suite's report and BENCHMARKS.md insertion, and bench_decode end to end with its transformers peer.

    python -m pytest -q tests/bench/test_bench_gpu.py
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from bench.targets import SHAPES, peak_for, random_llama, weight_bytes_per_token


def test_random_llama_is_built_on_the_given_device():
    """Built under the device context: on 'meta' no parameter or buffer is ever materialised on the CPU
    (an 8B model initialised on the CPU and copied took minutes)."""
    model = random_llama("8b", 128256, torch.device("meta"), torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    layers, hidden, inter, heads, kv = SHAPES["8b"]
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    want = layers * per_layer + 2 * 128256 * hidden + hidden  # + untied embedding/head + final norm
    assert sum(p.numel() for p in model.parameters()) == want == 8_030_261_248  # Llama-3.1-8B's count


def test_random_llama_on_cpu_is_seeded_and_runs():
    a = random_llama("tiny", 300, torch.device("cpu"), torch.float32, eos_token_id=2)
    b = random_llama("tiny", 300, torch.device("cpu"), torch.float32, eos_token_id=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = a(torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 3, 300) and torch.isfinite(out).all()
    assert a.generation_config.eos_token_id == 2


def test_weight_bytes_per_token_skips_an_untied_input_embedding():
    m = random_llama("tiny", 300, torch.device("cpu"), torch.bfloat16)
    emb = m.get_input_embeddings().weight
    total = sum(p.numel() for p in m.parameters()) * 2
    assert weight_bytes_per_token(m) == total - emb.numel() * 2
    m.lm_head.weight = emb  # tied: the LM head reads the whole matrix every token
    assert weight_bytes_per_token(m) == sum(p.numel() for p in m.parameters()) * 2


@pytest.mark.parametrize("name,bw,flops", [("NVIDIA H200", 4.8e12, 989e12), ("NVIDIA H100 80GB HBM3", 3.35e12, 989e12),
                                           ("NVIDIA H100 PCIe", 2.0e12, 756e12), ("NVIDIA H200 NVL", 4.8e12, 835e12),
                                           ("AMD EPYC, 2 cores", None, None)])
def test_datasheet_lookup(name, bw, flops):
    assert peak_for(name) == (bw, flops)


def test_eagle3_flop_formula_matches_torchs_count(tiny_target_dir):
    """The printed formula (target forward + 3x the drafter's forward over the rows each TTT step runs)
    against what torch's FlopCounterMode counts for the same forward and backward. The target's attention
    runs in torch's CPU SDPA kernel, which the counter has no formula for (it counts 0), so that term is
    left out of the comparison. Within 5 %: the counter sees full (non-causal) attention matrices in the
    drafter and skips the gradient of the frozen features; the formula counts causal attention and a
    plain 3x."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.bench_train_mfu import eagle3_flops, synthetic_batch
    from conf.schema import TargetConfig
    from conf.schema.drafter import Eagle3Config
    from drafters.eagle3 import Eagle3Drafter
    from drafters.target import load_target
    from training.signal import make_signal

    tiny_target = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    torch.manual_seed(0)
    drafter = Eagle3Drafter.from_target(Eagle3Config(draft_vocab_size=None, ttt_steps=3), tiny_target)
    batch = synthetic_batch(2, 48, len(tiny_target.tokenizer), 0)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = drafter.loss(make_signal("online", tiny_target, batch))
        loss.backward()
    want = eagle3_flops(tiny_target, drafter, batch["loss_mask"])
    assert want["total"] - want["target_attention"] == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert want["total"] == want["target"] + want["drafter"] and "3*[2*T*P_fc" in want["formula"] and "N_i=[96, 66, 64], scored R_i=[64, 64, 64]" in want["formula"]


def _suite_folder(tmp_path):
    ar = {"bench": "decode", "target": "random-weight Llama (tiny shape)", "row": "ar", "ours_ms_per_token": 2.0,
          "hf_ms_per_token": 3.0, "hf_peer": "hf-greedy-static", "hf_compiled": False, "hf_note": "",
          "best_ms_per_token": 2.0, "weight_bytes": 4e9, "bandwidth_gbs": 4000.0, "bandwidth_from": "datasheet",
          "floor_ms_per_token": 1.0}
    spec = {"bench": "decode", "target": ar["target"], "row": "spec", "drafter": "ngram", "tree": "chain:4",
            "temperature": 0.0, "tau": 1.0, "accept_by_depth": [0.0], "tok_s_spec": 400.0, "tok_s_ar": 500.0,
            "speedup": 0.8, "time_split": {"draft": 0.1, "verify": 0.85, "other": 0.05}, "identical_outputs": 3,
            "generations": 3, "prompts": 3, "target_forwards": 192, "depth_attempted": [192],
            "ci": {"tau": (1.0, 1.0), "speedup": (0.7, 0.9), "accept_by_depth": [None]}}
    (tmp_path / "decode-1b.jsonl").write_text(json.dumps(spec) + "\n" + json.dumps({**ar, "hf_ms_per_token": None})
                                              + "\n" + json.dumps(ar) + "\n")
    (tmp_path / "steps.tsv").write_text("decode-1b\t0\t40\t75\tpython bench/bench_decode.py --random-llama 1b\n"
                                        "train-8b\t124\t70\t70\tpython bench/bench_train_mfu.py\n"
                                        "decode-exact-1b\t200\t0\t45\tpython bench/bench_decode.py --exact\n")
    return tmp_path


def test_suite_report_tables_and_statuses(tmp_path):
    from bench.gpu_report import build

    machine = {"device": "cuda:0", "device_name": "NVIDIA H200", "cpu_count": 16, "torch": "2.11", "transformers": "5.17",
               "python": "3.12", "date": "2026-12-01T00:00:00+00:00"}
    key, md = build(_suite_folder(tmp_path), machine, "bash bench/gpu_suite.sh", 300)
    assert key == "NVIDIA H200" and md.startswith("<!-- gpu_suite: NVIDIA H200 -->")
    assert "| decode-1b | ok | 40 |" in md and "| train-8b | **stopped at its 70 s limit** | 70 |" in md
    assert "| decode-exact-1b | **skipped: suite time budget spent** |" in md
    # the summary after the peers wins over the one written before them; 400 tok/s = 2.5 ms/token vs best 2.0
    assert "| decode-1b | random-weight Llama (tiny shape) | 2.00 | 3.00 (eager) | 2.00 | 1.00 | 2.0× |" in md
    assert ("| ngram | chain:4 | 0 | 3 | 192 | 1.00 [1.00, 1.00] | 400.0 | 500.0 | 0.80× [0.70×, 0.90×] | 0.80× | 10 | 85 "
            "| 5 | 3/3 | - |") in md
    assert "(the training step left no result)" in md and "(no eval report" in md


def test_suite_report_replaces_the_placeholder_then_its_own_block(tmp_path):
    from bench.gpu_report import END, insert

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\n## GPU\n\n<!-- gpu_suite: not yet measured -->\nNot yet measured.\n<!-- /gpu_suite -->\n\n"
                  f"{END}\n\n## Later section\n")
    insert(md, "NVIDIA H200", "<!-- gpu_suite: NVIDIA H200 -->\nrun 1\n<!-- /gpu_suite -->")
    insert(md, "NVIDIA H100", "<!-- gpu_suite: NVIDIA H100 -->\nrun A\n<!-- /gpu_suite -->")
    insert(md, "NVIDIA H200", "<!-- gpu_suite: NVIDIA H200 -->\nrun 2\n<!-- /gpu_suite -->")
    text = md.read_text()
    assert "Not yet measured" not in text and "run 1" not in text
    assert text.index("run 2") < text.index("run A") < text.index(END) < text.index("## Later section")


def test_exact_override_is_valid_config():
    """The override bench_decode --exact and the GPU suite pass composes into the eval config."""
    from conf.schema import load_config

    assert load_config(["eval.exact=true"]).eval.exact is True


def test_compile_time_limit_raises():
    from bench.peers import _time_limit

    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="over 1 s"):
        with _time_limit(1):
            time.sleep(5)
    assert time.perf_counter() - t0 < 3


def test_bench_decode_rows_peers_and_best_baseline(tmp_path, capsys):
    """bench_decode end to end on a tiny random Llama: our rows, transformers' static-cache greedy peer on
    the same prompts, and the best-AR summary written before and after the peers."""
    from bench.bench_decode import main

    out = tmp_path / "rows.jsonl"
    assert main(["--random-llama", "tiny", "--prompts", "1", "--max-new-tokens", "6", "--reference", "ngram",
                 "--trees", "chain:2", "--threads", "1", "--no-write", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("row") or r.get("peer") for r in rows] == ["spec", "ar", "hf-greedy-static", "ar"]
    spec, early, hf, ar = rows
    assert spec["drafter"] == "ngram" and spec["identical_outputs"] == spec["generations"] == 1
    assert early["hf_ms_per_token"] is None and hf["new_tokens"] == 6 and hf["compiled"] is False
    assert ar["hf_ms_per_token"] == hf["ms_per_token"]
    assert ar["best_ms_per_token"] == min(ar["ours_ms_per_token"], hf["ms_per_token"])
    assert ar["floor_ms_per_token"] is None and ar["weight_bytes"] > 0  # no CPU bandwidth is guessed
    assert "vs best AR" in capsys.readouterr().out
