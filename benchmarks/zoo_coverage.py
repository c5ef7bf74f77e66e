"""What `fusion_advisor.patch` swaps in each model family of the zoo, by what its modules compute
(CPU, Triton interpreter: no GPU, no timing).

For every family of benchmarks/zoo.py, at its tiny config, and for thirteen more decoder families
(EXTRA below: Mistral, Qwen3, Gemma 2 and 3, OLMo-2, Granite, Cohere, StableLM, Falcon, Qwen2-MoE,
GPT-OSS, Ernie 4.5, Mamba) and 17 more decoder, encoder, seq2seq and vision families (BEYOND), this builds the model
(fp32, CPU) and
runs `fusion_advisor.patch(model, patterns=...)` with every pattern that has a runtime form, each
swap proven by patch's own numerics check against the module it replaces. It prints, per family,
the module swaps, the functions patched, and the modules of a kind we fuse (norms, activations,
MLPs, losses) that were left, with patch's reason. A family's row says what `apply` can reach before
any GPU runs: a cluster whose module is left here is one the advisor can only advise on.

    python benchmarks/zoo_coverage.py                     # every family
    python benchmarks/zoo_coverage.py --models gemma,phi3 --json coverage.json
    python benchmarks/zoo_coverage.py --blocks    # what compiled blocks compile, graph breaks
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import runpy
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels load: CPU tensors run the kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

# Families outside the GPU zoo, at tiny configs: decoder variants whose modules differ from Llama's
# (Gemma 2/3 norms, Olmo-2/Granite/Cohere MLPs under their own class names, q/k norms, MoE, SSM).
_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
           vocab_size=128)
EXTRA = [zoo.ModelSpec(name, "decoder", model_class, config_class, config, {})
         for name, model_class, config_class, config in (
             ("mistral", "MistralForCausalLM", "MistralConfig", _LM),
             ("qwen3", "Qwen3ForCausalLM", "Qwen3Config", _LM),
             ("gemma2", "Gemma2ForCausalLM", "Gemma2Config", {**_LM, "head_dim": 16}),
             ("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", {**_LM, "head_dim": 16}),
             ("olmo2", "Olmo2ForCausalLM", "Olmo2Config", _LM),
             ("granite", "GraniteForCausalLM", "GraniteConfig", _LM),
             ("cohere", "CohereForCausalLM", "CohereConfig", _LM),
             ("stablelm", "StableLmForCausalLM", "StableLmConfig", {**_LM, "qk_layernorm": True}),
             ("falcon", "FalconForCausalLM", "FalconConfig",
              dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=128)),
             ("qwen2-moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
              {**_LM, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
               "num_experts_per_tok": 2}),
             ("gpt-oss", "GptOssForCausalLM", "GptOssConfig",
              {**_LM, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16}),
             ("ernie4.5", "Ernie4_5ForCausalLM", "Ernie4_5Config", {**_LM, "pad_token_id": 0}),
             ("mamba", "MambaForCausalLM", "MambaConfig",
              dict(hidden_size=32, num_hidden_layers=1, vocab_size=128, state_size=4)))]
# Encoders, seq2seq and vision families nobody on the project tuned on, in the zoo's input kinds
# (2026-12-07: they found GroupNorm never swapped, EfficientNet's padded blocks refused, DistilBERT's loss
# module unchecked, ModernBERT's packed GeGLU MLP under other names, Nemotron's (1 + weight) LayerNorm)
_TOK, _MLM = {"kind": "causal_lm", **zoo.TOKENS_TINY}, {"kind": "masked_lm", **zoo.TOKENS_TINY}
_S2S, _IMG = {"kind": "seq2seq", **zoo.SEQ2SEQ_TINY_IN}, {"kind": "image", **zoo.IMAGE_TINY_IN}
_NODROP = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_S2S_CFG = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64, dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1, bos_token_id=0, use_cache=False)
_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
            num_labels=10)
_STAGES = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], drop_path_rate=0.0, num_labels=10)
_GPTJ = dict(n_embd=32, n_layer=1, n_head=2, rotary_dim=8, vocab_size=128, n_positions=64, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
BEYOND = [zoo.ModelSpec(name, family, model_class, config_class, config, inputs)
          for name, family, model_class, config_class, config, inputs in (
              ("t5-relu", "encoder-decoder", "T5ForConditionalGeneration", "T5Config",
               dict(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=128,
                    feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1, use_cache=False), _S2S),
              ("bloom", "decoder", "BloomForCausalLM", "BloomConfig",
               dict(hidden_size=32, n_layer=1, n_head=2, vocab_size=128, hidden_dropout=0.0, attention_dropout=0.0,
                    use_cache=False), _TOK),
              ("gptj", "decoder", "GPTJForCausalLM", "GPTJConfig", _GPTJ, _TOK),
              ("codegen", "decoder", "CodeGenForCausalLM", "CodeGenConfig", {**_GPTJ, "n_ctx": 64}, _TOK),
              ("biogpt", "decoder", "BioGptForCausalLM", "BioGptConfig",
               dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=128,
                    max_position_embeddings=64, use_cache=False, **_NODROP), _TOK),
              ("mpt", "decoder", "MptForCausalLM", "MptConfig",
               dict(d_model=32, n_heads=2, n_layers=1, expansion_ratio=2, max_seq_len=64, vocab_size=128,
                    use_cache=False), _TOK),
              ("electra", "encoder", "ElectraForMaskedLM", "ElectraConfig",
               dict(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, vocab_size=128, **_NODROP), _MLM),
              ("albert", "encoder", "AlbertForMaskedLM", "AlbertConfig",
               dict(embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, vocab_size=128, classifier_dropout_prob=0.0, **_NODROP), _MLM),
              ("pegasus", "encoder-decoder", "PegasusForConditionalGeneration", "PegasusConfig", _S2S_CFG, _S2S),
              ("marian", "encoder-decoder", "MarianMTModel", "MarianConfig", {**_S2S_CFG, "decoder_vocab_size": 128},
               _S2S),
              ("beit", "vision", "BeitForImageClassification", "BeitConfig",
               {**_VIT, "drop_path_rate": 0.0, **_NODROP}, _IMG),
              ("mobilenet-v2", "vision", "MobileNetV2ForImageClassification", "MobileNetV2Config",
               dict(image_size=32, depth_multiplier=0.25, num_labels=10, classifier_dropout_prob=0.0), _IMG),
              ("regnet", "vision", "RegNetForImageClassification", "RegNetConfig",
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, layer_type="y",
                    num_labels=10), _IMG),
              ("levit", "vision", "LevitForImageClassification", "LevitConfig",
               dict(image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
                    key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], drop_path_rate=0,
                    num_labels=10), _IMG),
              ("convnextv2", "vision", "ConvNextV2ForImageClassification", "ConvNextV2Config",
               {**_STAGES, "image_size": 32}, _IMG),
              ("bit", "vision", "BitForImageClassification", "BitConfig",
               {**_STAGES, "embedding_size": 8, "num_groups": 2, "layer_type": "preactivation"}, _IMG),
              ("swinv2", "vision", "Swinv2ForImageClassification", "Swinv2Config",
               dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=4,
                    drop_path_rate=0.0, num_labels=10, **_NODROP), _IMG))]
FAMILIES = {**zoo.BY_NAME, **{spec.name: spec for spec in EXTRA + BEYOND}}

NOT_THIS_FUNCTION = "is not the function this pattern replaces"   # patching._swap_function's words
# Class names of the kinds of module the patterns fuse: a module of these left unswapped is a gap.
# (at the name's end, give or take a short suffix: LayerNorm1P, MLPLayer, LayerNormPerHead; not BiT's
# PreActivationBottleneckLayer, a residual block)
FUSED_KINDS = re.compile(r"(Norm|GELU|SiLU|Swish|Activation|MLP)\w{0,8}$", re.IGNORECASE)


def runtime_patterns() -> list[str]:
    """Every pattern `patch` can apply to a live model: module forms, function patches, and
    pointwise chains (generated kernels)."""
    from fusion_advisor.kernels import all_patterns
    from fusion_advisor.patching import POINTWISE_CHAIN
    names = [p.name for p in all_patterns() if (p.modules and p.module_factory is not None) or p.function_patches]
    return names + [POINTWISE_CHAIN]


def build(spec: zoo.ModelSpec):
    import torch
    import transformers
    config, _ = spec.scaled(tiny=True) if spec.tiny else (spec.config, spec.inputs)
    torch.manual_seed(0)
    return getattr(transformers, spec.model_class)(getattr(transformers, spec.config_class)(**config)).float()


# A replacement that takes over another's calls when both are installed: the fused LM head + loss
# computes the loss itself, so the loss function it wraps is never called.
SUPERSEDES = {"linear_cross_entropy": ("cross_entropy",)}


def coverage(spec: zoo.ModelSpec, patterns: list[str], step: bool = True) -> dict:
    """{model, swapped: {"Old -> New": n}, functions: [path: pattern], left: {"Class: why": n},
    calls: {pattern: calls in one training step}, never_called: [pattern]}. `step`: run one tiny
    forward + backward of the patched model and count each replacement's calls, as `apply --verify`
    does: a function patched but never called (GPT-NeoX's partial rotary, handed back to the
    original on every call until f22ba97) is a gap the swap list alone does not show."""
    import fusion_advisor
    model = build(spec)
    handle = fusion_advisor.patch(model, patterns=patterns)
    try:
        calls = _calls_in_one_step(spec, model, {s.pattern for s in handle.swaps} | {f.pattern for f in handle.functions}) \
            if step else {}
        swapped = collections.Counter(f"{type(s.original).__name__} -> {type(s.replacement).__name__}"
                                      for s in handle.swaps)
        functions = sorted({f"{f.path.rsplit('.', 1)[-1]} ({f.pattern})" for f in handle.functions})
        by_path = dict(model.named_modules())
        left = collections.Counter()
        for path, why in handle.skipped:
            if NOT_THIS_FUNCTION in why:
                continue   # a function patch that does not apply here (another loss, another forward)
            cls = type(by_path[path]).__name__ if path in by_path else path
            left[f"{cls}: {_short(why)}"] += 1
        said = {path for path, _ in handle.skipped}
        for path, module in by_path.items():   # of a kind we fuse, yet neither swapped nor refused
            cls = type(module).__name__
            if path not in said and FUSED_KINDS.search(cls) and not _swapped_or_inside(path, handle.swaps):
                left[f"{cls}: {_why_not_fused(module)}"] += 1
    finally:
        handle.revert()
    superseded = {p for ran, names in SUPERSEDES.items() if calls.get(ran) for p in names}
    never = sorted(p for p, n in calls.items() if not n and p not in superseded)
    return {"model": spec.name, "family": spec.family, "swapped": dict(swapped), "functions": functions,
            "left": dict(left), "calls": calls, "never_called": never}


def _calls_in_one_step(spec: zoo.ModelSpec, model, patterns: set[str]) -> dict[str, int]:
    """Each installed replacement's calls in one forward + backward of the zoo's tiny batch."""
    import torch

    from fusion_advisor import calls
    from fusion_advisor.verify import call_key
    if not spec.scaled(tiny=True)[1]:   # the decoders outside the zoo: its causal-LM batch
        spec = dataclasses.replace(spec, inputs={"kind": "causal_lm"}, tiny_inputs=zoo.TOKENS_TINY)
    with tempfile.TemporaryDirectory() as folder:   # the zoo's own script, for its make_batch
        script = runpy.run_path(str(zoo.write_script(spec, Path(folder), tiny=True)), run_name="zoo_coverage")
    batch = script["make_batch"](torch.Generator().manual_seed(1), torch.float32)
    calls.reset()
    model.train()
    model(**batch).loss.backward()
    counted = calls.snapshot()
    return {p: counted.get(call_key(p), 0) for p in sorted(patterns)}


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")


def blocks(spec: zoo.ModelSpec) -> dict:
    """What `apply --verify`'s "compiled blocks" compiles in this family: its tiny config with two
    layers a stack (one makes no repeated block), the blocks compiled with dynamo's "eager" backend
    (graph capture without code generation), two training steps. {model, instances, graphs,
    graph_breaks, skipped}: graphs above the number of differently built blocks, or any graph
    break, mean compiled blocks leave part of the block to eager PyTorch."""
    import dataclasses
    import importlib.util
    import tempfile
    import torch
    from torch._dynamo.utils import counters
    from fusion_advisor import regional_compile
    config, inputs = spec.scaled(tiny=True)
    config = {k: (2 if k in _LAYER_KEYS and v == 1 else v) for k, v in config.items()}
    inputs = inputs or {"kind": "causal_lm", **zoo.TOKENS_TINY}   # EXTRA's decoders give none
    spec = dataclasses.replace(spec, tiny=config, tiny_inputs=inputs)
    with tempfile.TemporaryDirectory() as folder:   # the zoo's own script: its model and its batch
        path = zoo.write_script(spec, Path(folder), tiny=True)
        loader = importlib.util.spec_from_file_location(f"zoo_blocks_{path.stem}".replace("-", "_").replace(".", "_"), path)
        script = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(script)
    torch.manual_seed(0)
    model = script.build_model().float().train()
    batch = script.make_batch(torch.Generator().manual_seed(1), torch.float32)
    torch._dynamo.reset()
    regional_compile._compiled.clear()
    counters.clear()
    handle = regional_compile.compile_regions(model, [regional_compile.BLOCKS], backend="eager")
    try:
        for _ in range(2):
            model(**batch).loss.backward()
    finally:
        handle.revert()
    compiled = regional_compile.report().get(regional_compile.BLOCKS, {})
    return {"model": spec.name, "instances": compiled.get("instances", 0), "graphs": compiled.get("graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()), "skipped": [why for _, why in handle.skipped]}


def _why_not_fused(module) -> str:
    """Why no form took a module of a kind we fuse, as the form itself would say it."""
    import torch
    from fusion_advisor.module_forms import PointwiseChainModule, module_state, norm_parts
    cls = type(module).__name__
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return "a BatchNorm with no activation right after it in its block (batch_norm_act fuses BN -> activation)"
    if "norm" in cls.lower():
        parts = norm_parts(module)
        return parts if isinstance(parts, str) else "a last-dim norm no check proved"
    if "mlp" in cls.lower():
        return "not a gated MLP (gate_proj and up_proj, or gate_up_proj): its activation is fused on its own"
    chain = PointwiseChainModule(module, "coverage")
    if chain.kernel_for(torch.float32, torch.device("cpu")) is not None:
        return "a pointwise chain no pattern was asked for"
    return chain.refusals[(torch.float32, "cpu", module_state(module))]


def _swapped_or_inside(path: str, swaps) -> bool:
    return any(path == s.path or path.startswith(s.path + ".") for s in swaps)


def _short(why: str, width: int = 110) -> str:
    """The first reason of patch's "; "-joined list, the pattern's name kept, cut to `width`."""
    first = why.split("; ")[0]
    return first if len(first) <= width else first[:width - 1] + "…"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(FAMILIES),
                    help="comma-separated; default: the zoo's families, then " + ", ".join(s.name for s in EXTRA))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--blocks", action="store_true",
                    help="instead: what `apply --verify`'s compiled blocks compile in each family (blocks, "
                         "graphs, graph breaks; dynamo's eager backend, no code generation)")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"zoo_coverage.py: unknown model {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    import torch
    import transformers
    if args.blocks:
        return _print_blocks(names, args.json)
    patterns = runtime_patterns()
    print(f"fusion_advisor.patch(model, patterns={patterns}) on each family's tiny config, CPU "
          f"(torch {torch.__version__}, transformers {transformers.__version__})")
    rows = []
    for name in names:
        try:
            row = coverage(FAMILIES[name], patterns)
        except Exception as exc:   # one family failing must not hide the others
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
        rows.append(row)
        print(f"\n{name}")
        if "error" in row:
            print(f"  error: {row['error']}")
            continue
        for what, n in row["swapped"].items():
            print(f"  swapped   {n} x {what}")
        for f in row["functions"]:
            print(f"  function  {f}")
        if row["calls"]:
            print("  calls     " + ", ".join(f"{p} x{n}" for p, n in row["calls"].items()) + " (one tiny step)")
        for p in row["never_called"]:
            print(f"  NEVER CALLED {p}: installed, but no call of the step reached its kernel")
        for what, n in row["left"].items():
            print(f"  left      {n} x {what}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _print_blocks(names: list[str], json_path: str | None) -> int:
    import torch
    import transformers
    print(f"compile_regions(model, ['compile:blocks'], backend='eager') on each family's tiny config, two layers a "
          f"stack, two steps, CPU (torch {torch.__version__}, transformers {transformers.__version__})")
    print(f"{'model':<12} {'blocks':>6} {'graphs':>6} {'breaks':>6}  skipped")
    rows = []
    for name in names:
        try:
            row = blocks(FAMILIES[name])
        except Exception as exc:   # one family failing must not hide the others
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
        rows.append(row)
        if "error" in row:
            print(f"{name:<12} error: {row['error']}")
        else:
            print(f"{name:<12} {row['instances']:>6} {row['graphs']:>6} {row['graph_breaks']:>6}  "
                  f"{'; '.join(row['skipped']) or '-'}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
