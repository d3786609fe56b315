"""Training-step time of each objective (token, hass, griffin, gto) for an EAGLE drafter, and GTO's tree reward
over a short run.

    python bench/bench_eagle_objectives.py                                  # a random Llama target, CPU
    python bench/bench_eagle_objectives.py --steps 20 --groups 16 --depth 7 --top-k 10    # the GTO paper's trees
    python bench/bench_eagle_objectives.py --device cuda --batch 4 --seq 1024 --hidden 4096 --layers 32 --vocab 128256

The target is a random Llama of the given shape with its LM head scaled (a peaked teacher), NOT a trained
model; sequences are its own samples after a short prompt (what data_gen's regeneration gives). A step is
the objective's forward, backward and an AdamW update on one micro-batch; objectives take steps in turn
(round-robin, so a shared machine's load hits them alike), the first is a warm-up, the median is printed. GTO fine-tunes a copy of the drafter after --pretrain token steps (that copy is also M0).
Prints ms/step per objective, the ratio to the token objective, and the mean tree reward and greedy accepted
length of every drafter's trees (GTO's own scoring) before and after its steps; `gto-only` is the GTO
surrogate without the token loss.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def make_target(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from drafters.target import Target

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), vocab_size=args.vocab,
                      max_position_embeddings=max(512, 2 * args.seq), tie_word_embeddings=False)
    with torch.device(args.device):  # allocated and initialised there: an 8B shape built on the CPU took minutes
        model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.peak)
    return Target(model, tokenizer=None, name="random-demo-shape")


@torch.no_grad()
def make_signal(target, args):
    from drafters.base import TargetSignal

    g = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(3, target.vocab_size, (args.batch, 8), generator=g, device=args.device)
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    out = target(ids, cache=cache, use_cache=True, logits=False)
    nxt = ids
    while ids.shape[1] < args.seq:
        p = torch.softmax(out.logits[:, -1].float(), -1)
        nxt = torch.multinomial(p, 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
        out = target(nxt, cache=cache, use_cache=True, logits=False)
    am = torch.ones_like(ids)
    lm = am.clone()
    lm[:, :8] = 0
    o = target(ids)
    return TargetSignal(input_ids=ids, attention_mask=am, loss_mask=lm, features=o.features,
                        last_hidden=o.last_hidden, lm_head=target.lm_head)


def objective_for(name, args, target, reference):
    from conf.schema.eval import TreeConfig
    from conf.schema.objective import OBJECTIVE_SCHEMAS
    from training.objectives import token_objective
    from training.objectives.addons import options_objective, unroll_options
    from training.objectives.gto import GTOObjective

    if name == "token":
        return token_objective
    if name == "gto-only":  # the GTO surrogate alone (no token loss): what the tree reward term does by itself
        ocfg = OBJECTIVE_SCHEMAS["gto"](group_size=args.group_size, groups=args.groups, token_weight=0.0, weight=1.0)
        tree = TreeConfig(kind="dynamic", depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens)
        return GTOObjective(ocfg, tree, target, copy.deepcopy(reference))
    if name in ("hass", "griffin"):
        ocfg = OBJECTIVE_SCHEMAS[name]()
        return options_objective(unroll_options(ocfg, getattr(ocfg, "keep_topk", 0)))
    ocfg = OBJECTIVE_SCHEMAS["gto"](group_size=args.group_size, groups=args.groups)
    tree = TreeConfig(kind="dynamic", depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens)
    return GTOObjective(ocfg, tree, target, copy.deepcopy(reference))


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--peak", type=float, default=20.0, help="LM-head scale of the random target")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--draft-vocab", type=int, default=None)
    ap.add_argument("--pretrain", type=int, default=30, help="token steps before timing (a partly trained drafter)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--total-tokens", type=int, default=60)
    ap.add_argument("--objectives", default="token,hass,griffin,gto,gto-only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from conf.schema.drafter import Eagle3Config
    from drafters.eagle3 import Eagle3Drafter

    target = make_target(args)
    sig = make_signal(target, args)
    torch.manual_seed(0)
    base = Eagle3Drafter.from_target(Eagle3Config(draft_vocab_size=args.draft_vocab, ttt_steps=args.ttt_steps), target)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-2)
    for _ in range(args.pretrain):
        loss, met = base.loss(sig)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"target: random Llama h={args.hidden} L={args.layers} V={args.vocab}; batch {args.batch} x {args.seq} "
          f"tokens; eagle3 ttt_steps={args.ttt_steps}; device {args.device}, {args.threads} threads")
    print(f"drafter after {args.pretrain} token steps: acc/1 {met['acc/1']:.3f}; GTO trees: dynamic depth {args.depth} "
          f"top_k {args.top_k} total {args.total_tokens}, {args.groups} groups x {args.group_size} positions per sequence")
    names = args.objectives.split(",")
    runs = {}
    for name in names:
        m = copy.deepcopy(base)
        runs[name] = {"model": m, "obj": objective_for(name, args, target, base),
                      "opt": torch.optim.AdamW(m.parameters(), lr=args.lr), "spent": [], "mets": []}
    # Round-robin: one step of every objective in turn, so a shared machine's load hits them alike.
    for i in range(args.steps + 1):
        for name in names:
            r = runs[name]
            sync(args.device)
            t0 = time.perf_counter()
            loss, met = r["obj"](r["model"], sig)
            r["opt"].zero_grad()
            loss.backward()
            r["opt"].step()
            sync(args.device)
            if i:  # step 0 is the warm-up
                r["spent"].append(time.perf_counter() - t0)
            r["mets"].append(met)
    ms = {name: 1000 * sorted(r["spent"])[len(r["spent"]) // 2] for name, r in runs.items()}  # median
    judge = objective_for("gto", args, target, base)  # scores every final drafter's trees on the same batch
    with torch.no_grad():
        _, start = judge.gto_loss(base, sig)
    print(f"before: tree reward {start['gto/reward']:.3f}, greedy accepted {start['gto/accept_len']:.2f} "
          f"({int(start['gto/trees'])} trees)")
    for name in names:
        with torch.no_grad():
            _, end = judge.gto_loss(runs[name]["model"], sig)
        print(f"{name:8s} {ms[name]:9.1f} ms/step (median)  x{ms[name] / ms.get('token', ms[name]):5.2f} vs token   "
              f"after {args.steps + 1} steps: tree reward {end['gto/reward']:.3f}, accepted {end['gto/accept_len']:.2f}",
              flush=True)

if __name__ == "__main__":
    main()
