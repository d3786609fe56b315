"""Exports as their consumers load them, with the consumers' own released code, on the demo target:

    speculators 0.9.0   SpeculatorModel.from_pretrained on the vLLM folder; its forward drafts
    specforge 0.2.0     its LlamaForCausalLMEagle3 from config.json + load_state_dict on the SGLang folder; its forward drafts
    medusa-llm 0.1      FasterDecoding/Medusa's MedusaModel over a transformers base + medusa_lm_head.pt; its heads
    transformers        generate(assistant_model=<the hf folder>) on a tied-embedding small drafter

Each loads the folder the way its README says, from another working directory (neither the folder nor the
project: consumers resolve relative paths against it), with the README's own Python code, the target and the
folder passed explicitly as the README has the user set them; then it must draft the same first tokens as our
decoder's drafter (export.formats.load_exported) on real positions (chat prompts + the target's greedy
continuation). SGLang and vLLM are GPU servers that do not
install here: their loaders are replayed from their released source (file:line cited) as layout tests,
which matter most for SGLang, since it ignores tensor names it does not know (a misnamed tensor would
never raise there).

    pip install -e ".[dev,consumers]"   # plus the --no-deps installs in .ci/run
    python -m pytest -q tests/export/test_export_consumers.py
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conf.schema import PROJECT_ROOT, TargetConfig, run_dir
from conf.schema.drafter import Eagle1Config, Eagle3Config, MedusaConfig, SmallConfig
from drafters.target import load_target
from export.formats import ExportContext, check_format, load_exported, load_exported_model, write_export
from export.formats.common import target_ref
from tests.export_util import absolute_paths, assert_portable_readme, noisy, readme_code

# The consumers' own code still passes transformers' deprecated `past_key_values` (pyproject turns that
# warning into an error for our code); tests that run their forwards let it through.
THEIR_OLD_CACHE_ARG = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
INSTALL = "; install the consumers group (pip install -e '.[consumers]' and the --no-deps lines in .ci/run)"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A copy of the demo target beside the test's exports (a folder they share below the filesystem root,
    as a run's exports share the project with assets/), so the folders name it by relative path."""
    import shutil

    return str(shutil.copytree(PROJECT_ROOT / "assets" / "demo-target", tmp_path_factory.mktemp("t") / "demo-target"))


@pytest.fixture(scope="module")
def demo(demo_dir):
    return load_target(TargetConfig(path=demo_dir), device="cpu")


@pytest.fixture(scope="module")
def sequences(demo):
    """Real positions: the export check's chat prompts, each with the target's greedy continuation."""
    from export.stage import check_prompt_ids

    out = []
    for ids in check_prompt_ids(demo, 4):
        ids = torch.tensor([ids])
        with torch.no_grad():
            out.append(demo.model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0))
    return out


def eagle3(target, draft_vocab):
    from drafters.eagle3 import Eagle3Drafter

    torch.manual_seed(0)
    counts = torch.rand(target.vocab_size, generator=torch.Generator().manual_seed(1))
    return noisy(Eagle3Drafter.from_target(Eagle3Config(draft_vocab_size=draft_vocab), target, token_counts=counts))


def export(model, target, fmt, out, dtype=torch.float32):
    """As the export stage writes it: a local target is named by a placeholder (target_ref), never a path of
    this machine, in config files and README alike."""
    ref = target_ref(target.name, out)
    assert ref == "<path of demo-target>"
    write_export(model, target, fmt, out, ExportContext(dtype=dtype, target_ref=ref, final_dir=out))
    assert check_format(out, fmt) == []
    for f in out.glob("*.json"):
        assert absolute_paths(f.read_text()) == [] and str(target.name) not in f.read_text()
    assert_portable_readme(out, target.name)
    return out


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a directory that is neither the export folder nor the project: a relative reference to the
    target would not resolve here."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def run_readme(folder, marker, target_dir) -> dict:
    """Execute the README's Python block after `marker`, with TARGET and DRAFT set as the user sets them; its
    variables come back."""
    ns: dict = {}
    exec(compile(readme_code(folder, marker, TARGET=str(target_dir), DRAFT=str(folder)), "README.md", "exec"), ns)
    return ns


def our_first_drafts(folder, target, ids) -> torch.Tensor:
    """Our decoder's drafter over the exported folder: its root draft (greedy) after every prefix
    ids[:, :t+2], i.e. the token it proposes for position t+2 (drafters/base.py's start/expand)."""
    from decoding.tree import DraftTree

    drafter = load_exported(folder, target)
    feats = target(ids)
    feats = feats.features if drafter.feature_source == "features" else feats.last_hidden
    out = []
    with torch.no_grad():
        for t in range(ids.shape[1] - 1):
            drafter.start(ids[:, :t + 2], feats[:, :t + 1])
            out.append(int(drafter.expand(DraftTree.empty(1), torch.tensor([[-1]]))[0, 0].argmax()))
    return torch.tensor(out)


def aux_states(target, ids, layers):
    """The hidden states entering target `layers` (what vLLM/SGLang capture), concatenated, from plain
    transformers (hidden_states[i] is the input of layer i)."""
    with torch.no_grad():
        hs = target.model(ids, output_hidden_states=True).hidden_states
    return torch.cat([hs[i] for i in layers], dim=-1)


def assert_same_drafts(theirs: list[torch.Tensor], ours: list[torch.Tensor]):
    """Equal first drafts at every position. Both sides compute in float32 but through different kernels
    (speculators/SpecForge layers vs ours), so logits agree to ~1e-6, not bit for bit; the random drafters
    here have no near-ties at these positions, so any disagreement is a wrong weight."""
    theirs, ours = torch.cat(theirs), torch.cat(ours)
    assert theirs.numel() >= 100 and torch.equal(theirs, ours), (theirs != ours).nonzero().flatten()[:10]


# --------------------------------------------------------------------------------------------------
# vLLM folder <- speculators
# --------------------------------------------------------------------------------------------------
@THEIR_OLD_CACHE_ARG
@pytest.mark.parametrize("draft_vocab", [1024, None], ids=["vocab1024", "full-vocab"])
def test_speculators_loads_the_vllm_folder_and_drafts_like_our_decoder(demo, demo_dir, sequences, draft_vocab,
                                                                        tmp_path, elsewhere):
    pytest.importorskip("speculators", reason="speculators is not installed" + INSTALL)
    model = eagle3(demo, draft_vocab)
    out = export(model, demo, "vllm", tmp_path / "vllm")
    ns = run_readme(out, "The speculators library", demo_dir)  # the README's code, from another directory
    config = ns["config"]  # speculators' pydantic validation passed
    assert type(config).__name__ == "Eagle3SpeculatorConfig" and config.norm_before_residual is False
    sm = ns["model"].eval()
    assert type(sm).__name__ == "Eagle3DraftModel" and sm.draft_vocab_size == model.draft_vocab_size
    # the folder is self-sufficient: speculators drafts with its embedding, the target's
    assert torch.equal(sm.embed_tokens.weight, demo.model.get_input_embeddings().weight)
    assert torch.equal(sm.lm_head.weight, model.lm_head.weight)
    if draft_vocab is None:
        assert sm.d2t is None  # a full vocabulary has no map (vLLM would fail on one)
    else:
        assert torch.equal(sm.d2t, model.d2t) and torch.equal(sm.t2d, model.t2d)
    theirs, ours = [], []
    for ids in sequences:
        n = ids.shape[1]
        # speculators' alignment (models/eagle3/data.py shift_batch): token x_{t+1} with the verifier's
        # hidden states after x_t, at position t+1; draft step 0 proposes x_{t+2}
        with torch.no_grad():
            drafts = sm(hidden_states=aux_states(demo, ids, sm.config.eagle_aux_hidden_state_layer_ids)[:, :-1],
                        input_ids=ids[:, 1:], document_ids=torch.zeros(1, n - 1, dtype=torch.long),
                        position_ids=torch.arange(1, n)[None], ttt_steps=1)[0][0]
        theirs.append(drafts + sm.d2t[drafts] if sm.d2t is not None else drafts)
        ours.append(our_first_drafts(out, demo, ids))
    assert_same_drafts(theirs, ours)


# --------------------------------------------------------------------------------------------------
# SGLang folder <- SpecForge (which writes and trains SGLang's EAGLE-3 layout)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft_vocab", [1024, None], ids=["vocab1024", "full-vocab"])
def test_specforge_loads_the_sglang_folder_and_drafts_like_our_decoder(demo, demo_dir, sequences, draft_vocab, tmp_path,
                                                                        elsewhere):
    pytest.importorskip("specforge.modeling.auto", reason="specforge is not installed" + INSTALL)
    model = eagle3(demo, draft_vocab)
    out = export(model, demo, "sglang", tmp_path / "sglang")
    ns = run_readme(out, "SpecForge", demo_dir)  # the README's code, from another directory
    sf, config = ns["model"].eval(), ns["config"]
    assert type(sf).__name__ == "LlamaForCausalLMEagle3"
    # every tensor has its place, d2t/t2d included at full vocabulary (SpecForge's exporter requires them);
    # only the embedding comes from the target (load_embedding, as SGLang shares it)
    assert ns["unexpected"] == [] and ns["missing"] == ["embed_tokens.weight"]
    if draft_vocab is None:  # the identity maps: draft id = target id
        assert torch.equal(sf.d2t, torch.zeros(demo.vocab_size, dtype=torch.long)) and bool(sf.t2d.all())
    assert torch.equal(sf.embed_tokens.weight, demo.model.get_input_embeddings().weight)
    layers = [i + 1 for i in config.eagle_config["eagle_aux_hidden_state_layer_ids"]]  # SGLang adds one
    theirs, ours = [], []
    for ids in sequences:
        n = ids.shape[1]
        # SpecForge wraps its norms and RoPE in torch.compile (a C++ toolchain and minutes on CPU): run
        # the same functions eagerly; the rest is SpecForge's training step 0 (algorithms/eagle3/model.py:313-393)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            hidden = sf.project_hidden_states(aux_states(demo, ids, layers)[:, :-1])
            mask = sf.prepare_decoder_attention_mask(torch.ones(1, n - 1, dtype=torch.bool), hidden, 1, n - 1, 0)
            # positions from 0 as SpecForge numbers them (its RoPE cache covers the sequence only); RoPE
            # is relative, so this is the same attention as ours up to rounding
            h = sf.backbone(input_embeds=sf.embed_input_ids(ids[:, 1:]), hidden_states=hidden,
                            cache_hidden=[[], []], attention_mask=mask, position_ids=torch.arange(n - 1)[None],
                            past_key_values=None, use_cache=False)
            drafts = sf.compute_logits(h).argmax(-1)[0]
        theirs.append(drafts + sf.d2t[drafts])
        ours.append(our_first_drafts(out, demo, ids))
    assert_same_drafts(theirs, ours)


# --------------------------------------------------------------------------------------------------
# SGLang and vLLM loaders, replayed from their released source (they need a GPU server)
# --------------------------------------------------------------------------------------------------
_STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
            (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]
_LAYER = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
          "mlp.down_proj.weight", "post_attention_layernorm.weight"]


def _stack(name: str):
    for param, shard_name, shard in _STACKED:
        if shard_name in name:
            return name.replace(shard_name, param), shard
    return name, None


def sglang_eagle3_load(names, params):
    """sglang 0.5.23 srt/models/llama_eagle3.py:325-378 (LlamaForCausalLMEagle3.load_weights): legacy
    midlayer -> layers.0, d2t read as hot-token offsets, t2d skipped, q/k/v and gate/up stacked, then the
    name or model.<name>; a name that matches no parameter is skipped without a word."""
    placed = {}
    for name in names:
        name0 = name
        name = name.replace("midlayer", "layers.0")
        if "d2t" in name or "t2d" in name:
            placed[name0] = "hot_token_id" if "d2t" in name else "skipped"
            continue
        name, shard = _stack(name)
        param = name if name in params else f"model.{name}"
        placed[name0] = (param, shard) if param in params else None
    return placed


def sglang_eagle3_params():
    """Parameters of LlamaForCausalLMEagle3 with tie_word_embeddings false (llama_eagle3.py:121-323):
    model.embed_tokens (replaced by the target's: speculative/eagle_worker_v2.py:362, set_embed)."""
    return {"model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.0.hidden_norm.weight",
            *(f"model.layers.0.{p}" for p in _LAYER)}


def vllm_eagle3_load(names, params):
    """vllm 0.33.0 model_executor/models/llama_eagle3.py:420-470 (Eagle3LlamaForCausalLM.load_weights): t2d
    skipped, d2t renamed draft_id_to_target_id, model.<name> unless lm_head, then hf_to_vllm_mapper
    (llama_eagle3.py:291-299: midlayer. -> layers.0., q/k/v and gate/up stacked). AutoWeightsLoader
    raises on a name with no parameter (model_executor/models/utils.py:443)."""
    placed = {}
    for name in names:
        if "t2d" in name:
            placed[name] = "skipped"
            continue
        new = name.replace("d2t", "draft_id_to_target_id") if "d2t" in name else (
            name if "lm_head" in name else f"model.{name}")
        new, shard = _stack(new.replace("midlayer.", "layers.0."))
        if new not in params:
            raise ValueError(f"There is no module or parameter named {new!r}")
        placed[name] = (new, shard)
    return placed


def vllm_eagle3_params(draft_vocab, vocab):
    """Eagle3LlamaForCausalLM's parameters (llama_eagle3.py:192-257, 301-345): draft_id_to_target_id only
    when the vocabularies differ (llama_eagle3.py:339-345)."""
    p = {"model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
         "model.layers.0.input_layernorm.weight", "model.layers.0.hidden_norm.weight",
         *(f"model.layers.0.{p}" for p in _LAYER)}
    return p | ({"draft_id_to_target_id"} if draft_vocab != vocab else set())


def _covered(placed):
    """{parameter: set of shards} that the load wrote."""
    cover: dict = {}
    for dest in placed.values():
        if isinstance(dest, tuple):
            cover.setdefault(dest[0], set()).add(dest[1])
    return cover


def _full_cover(cover, params):
    return set(cover) == params and cover.get("model.layers.0.self_attn.qkv_proj.weight") == {"q", "k", "v"} and \
        cover.get("model.layers.0.mlp.gate_up_proj.weight") == {0, 1}


@pytest.mark.parametrize("draft_vocab", [100, None], ids=["vocab100", "full-vocab"])
def test_sglang_and_vllm_loaders_place_every_tensor(tiny_target_dir, draft_vocab, tmp_path):
    target = load_target(TargetConfig(path=tiny_target_dir("llama"), feature_layers=[1, 2, 3]), device="cpu")
    model = eagle3(target, draft_vocab)
    V, vd = target.vocab_size, model.draft_vocab_size
    sg = write_export(model, target, "sglang", tmp_path / "s", ExportContext(target_ref="org/t"))
    placed = sglang_eagle3_load(load_file(sg / "model.safetensors"), sglang_eagle3_params())
    assert None not in placed.values()  # nothing silently dropped
    assert _full_cover(_covered(placed), sglang_eagle3_params() - {"model.embed_tokens.weight"})
    assert "d2t" in placed and placed["d2t"] == "hot_token_id"  # identity maps at full vocabulary too (SpecForge)
    vl = write_export(model, target, "vllm", tmp_path / "v", ExportContext(target_ref="org/t"))
    placed = vllm_eagle3_load(load_file(vl / "model.safetensors"), vllm_eagle3_params(vd, V))
    assert _full_cover(_covered(placed), vllm_eagle3_params(vd, V))  # embed_tokens included: self-sufficient
    # what the replay catches: a misnamed tensor SGLang drops silently, a full-vocab d2t vLLM cannot place;
    # check_format reports both before any engine sees the folder
    t = load_file(sg / "model.safetensors")
    t["midlayer.mlp.upproj.weight"] = t.pop("midlayer.mlp.up_proj.weight")
    save_file(t, sg / "model.safetensors")
    assert sglang_eagle3_load(t, sglang_eagle3_params())["midlayer.mlp.upproj.weight"] is None
    assert "model.safetensors: unexpected tensor midlayer.mlp.upproj.weight (the consumer does not load it)" in \
        check_format(sg)
    if vd == V:
        with pytest.raises(ValueError, match="no module or parameter named 'draft_id_to_target_id'"):
            vllm_eagle3_load(["d2t"], vllm_eagle3_params(vd, V))


def test_sglang_eagle1_loader_places_every_tensor(tiny_target_dir, tmp_path):
    """sglang srt/models/llama_eagle.py:146-150 prefixes model. (lm_head aside) and hands each tensor to
    LlamaForCausalLM's loader (llama.py:708-779: stacked q/k/v, gate/up; unknown names only logged).
    Parameters (llama_eagle.py:42-93): fc with bias, layer 0 without input_layernorm; embed_tokens and
    lm_head come from the target (set_embed_and_head)."""
    from drafters.eagle1 import Eagle1Drafter

    target = load_target(TargetConfig(path=tiny_target_dir("llama")), device="cpu")
    torch.manual_seed(0)
    model = noisy(Eagle1Drafter.from_target(Eagle1Config(num_layers=2), target))
    out = write_export(model, target, "sglang", tmp_path, ExportContext(target_ref="org/t"))
    params = {"model.fc.weight", "model.fc.bias", "model.layers.1.input_layernorm.weight",
              *(f"model.layers.{i}.{p}" for i in range(2) for p in _LAYER)}
    placed = {}
    for name in load_file(out / "model.safetensors"):
        new, shard = _stack(name if "lm_head" in name else f"model.{name}")
        placed[name] = (new, shard) if new in params else None
    assert None not in placed.values() and set(_covered(placed)) == params
    assert all(_covered(placed)[f"model.layers.{i}.self_attn.qkv_proj.weight"] == {"q", "k", "v"} for i in range(2))


# --------------------------------------------------------------------------------------------------
# Medusa folder <- FasterDecoding/Medusa (medusa-llm)
# --------------------------------------------------------------------------------------------------
@THEIR_OLD_CACHE_ARG
def test_medusa_llm_loads_the_heads_and_drafts_like_our_decoder(demo, demo_dir, sequences, tmp_path, elsewhere):
    mm = pytest.importorskip("medusa.model.medusa_model", reason="medusa-llm is not installed" + INSTALL)
    from drafters.medusa import MedusaDrafter

    torch.manual_seed(0)
    # one ResBlock per head: medusa-llm repeats one block object per head (medusa_model.py:87)
    model = noisy(MedusaDrafter.from_target(MedusaConfig(num_heads=3, num_layers=1), demo))
    out = export(model, demo, "medusa", tmp_path / "medusa")
    # medusa-llm 0.1's MedusaModel.from_pretrained builds the base with its own KV-cache Llama
    # (modeling_llama_kv.py), which predates transformers 5: the README's path builds it with transformers
    # (the README's claim, checked on a copy whose config names the target's real path)
    import shutil

    direct = shutil.copytree(out, tmp_path / "direct")
    cfg = json.loads((direct / "config.json").read_text())
    (direct / "config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": demo_dir}))
    with pytest.raises(KeyError, match="type"):
        mm.MedusaModel.from_pretrained(str(direct), dtype=torch.float32)
    medusa = run_readme(out, "FasterDecoding/Medusa", demo_dir)["model"]  # the README's code (strict head load)
    assert type(medusa) is mm.MedusaModel
    # load_state_dict(strict=False) there ignores a misnamed tensor: compare what it holds
    theirs_sd, ours_sd = medusa.medusa_head.state_dict(), model.heads_state_dict()
    assert {f"medusa_head.{k}" for k in theirs_sd} == set(ours_sd)
    assert all(torch.equal(v, ours_sd[f"medusa_head.{k}"]) for k, v in theirs_sd.items())
    back = load_exported_model(out, demo)  # what our decoder drafts with
    for ids in sequences:
        with torch.no_grad():
            theirs = medusa(input_ids=ids)  # [heads, 1, n, V]
            ours = torch.stack(back.head_logits(demo(ids).last_hidden))
        # the same base hidden states and the same Linear/SiLU ops: equal to float rounding
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    assert_portable_readme(out, demo_dir)


# --------------------------------------------------------------------------------------------------
# hf folder <- transformers assisted generation
# --------------------------------------------------------------------------------------------------
def test_tied_small_drafter_exports_and_assists_exactly(demo, demo_dir, sequences, cfg_for, elsewhere):
    """The demo target ties its embeddings, and so does a small drafter built from it: the stage's own
    checks pass and transformers' assisted generation with the published folder equals greedy output."""
    from transformers import AutoModelForCausalLM

    from drafters.small_lm import SmallDrafter
    from export.stage import run

    cfg = cfg_for("stage=export", "export=hf", f"target.path={demo_dir}", "drafter=small", "export.check_prompts=2",
                  "export.check_max_new_tokens=12")
    torch.manual_seed(0)
    drafter = noisy(SmallDrafter.from_target(SmallConfig(num_layers=1), demo))
    assert drafter.model.config.tie_word_embeddings
    drafter.save_pretrained(run_dir(cfg) / "train" / "final")
    res = run(cfg)  # format check, exact reload, lossless decode with our decoder
    out = res["out_dir"]
    assert "lm_head.weight" not in load_file(os.path.join(out, "model.safetensors"))  # tied: written once
    assert json.loads(open(os.path.join(out, "config.json")).read())["tie_word_embeddings"] is True
    ns = run_readme(out, "transformers (assisted generation)", demo_dir)  # the README's code, from elsewhere
    want = ns["target"].generate(**ns["tok"]("Hello", return_tensors="pt"), do_sample=False, max_new_tokens=64)
    assert torch.equal(ns["out"], want)  # the same bf16 target with and without its assistant: lossless
    draft = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert draft.lm_head.weight is draft.model.embed_tokens.weight and draft.dtype == torch.bfloat16
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    for ids in sequences:
        prompt = ids[:, :-16]
        assert torch.equal(demo.model.generate(prompt, assistant_model=draft, **kw), demo.model.generate(prompt, **kw))
    assert_portable_readme(out, demo_dir)
