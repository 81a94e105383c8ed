"""`lowbit demo` (and `make demo`): the main job on the bundled model, end to end.

Quantizes SmolLM2-135M's Linear layers to BF16, INT8 (per-channel) and INT4 (w4g64) with RTN
(and INT4 with the tied embedding/LM head at int8), and prints one row per variant next to FP32: whole-model and Linear-weight size, bits per
weight, held-out perplexity, batch-1 decode tokens/s, and a greedy completion of one prompt.
Then it saves the INT4 model, loads it back, and checks that the logits are identical.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import warnings

import torch

__all__ = ["run_demo"]

VARIANTS = (("FP32", None), ("BF16", "bf16"), ("INT8", "int8"), ("INT4", "w4g64"), ("INT4+head", "w4g64+head"))


def _spec(scheme: str):
    """``w4g64+head``: w4g64 Linear layers plus the tied embedding/LM head at int8 (one copy)."""
    import lowbit

    if scheme.endswith("+head"):
        return lowbit.Recipe.from_scheme(scheme[:-5]).add("model.embed_tokens", "int8").add("lm_head", "int8")
    return scheme


def run_demo(*, max_tokens: int = 8192, new_tokens: int = 32, threads: int = 2, out=sys.stdout) -> list[dict]:
    import lowbit
    from lowbit.evaluate.compare import DEMO_PROMPT, measure
    from lowbit.evaluate.table import text_table
    from lowbit.kernels import cpu
    from lowbit.models.zoo import load_model

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # library deprecation chatter would bury the table
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - the zoo model needs transformers anyway
        pass
    say = lambda s="": print(s, file=out, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    zoo = load_model("smollm2-135m")
    say(f"smollm2-135m loaded in {time.perf_counter() - t0:.1f}s ({zoo.source})")
    rows = []
    models = {}
    for label, scheme in VARIANTS:
        if scheme is not None:
            say(f"quantizing {label} ({scheme}) ...")
        model = zoo.model if scheme is None else lowbit.quantize(copy.deepcopy(zoo.model), _spec(scheme), progress=True)
        models[label] = model
        say(f"measuring {label}: perplexity on {max_tokens} tokens, then decode speed ...")
        r = measure(model, zoo, label=label, max_tokens=max_tokens, new_tokens=new_tokens, progress=True)
        r["scheme"] = scheme or "fp32"
        rows.append(r)
    fp = rows[0]
    table = []
    for r in rows:
        # bytes of the decoder blocks' Linear weights (the head, when quantized, is apart)
        blocks = [x for x in lowbit.size_of(models[r["variant"]]).layers if x.name.startswith("model.layers.")]
        lin = sum(x.bytes for x in blocks)
        lin_fp32 = 4 * sum(x.numel for x in blocks)
        table.append([
            r["variant"], r["scheme"], f"{r['bytes'] / 1e6:.1f}", f"{lin / 1e6:.1f}", f"{8 * lin / (lin_fp32 / 4):.3f}",
            f"{lin_fp32 / lin:.2f}x", f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / fp['ppl'] - 1):+.2f}%",
            f"{r['tok_s']:.1f}", f"{r['tok_s'] / fp['tok_s']:.2f}x",
        ])  # fmt: skip
    say()
    say(text_table(["variant", "scheme", "model MB", "Linear MB", "bits/w", "Linear vs fp32", "ppl", "Δppl",
                    "decode tok/s", "speed"], table))  # fmt: skip
    say(
        f"\nLinear layers of the 30 decoder blocks are quantized; the tied embedding/LM head "
        f"({zoo.model.model.embed_tokens.weight.numel() / 1e6:.1f}M params) stays FP32 by default; "
        f"INT4+head also stores it once at int8 (a recipe rule names it), which decode reads every token. "
        f"Perplexity: {fp['ppl_tokens']} held-out tokens of {fp['text']} text; decode: batch 1, greedy, "
        f"{new_tokens} tokens, median of 3, {threads} threads, lowbit's decoder (lowbit.generate) for every variant; "
        f"{cpu.summary()}."
    )
    say(f'\nprompt: "{DEMO_PROMPT}"')
    for r in rows:
        say(f"  {r['variant']:>5}: {r['completion']!r}")

    # save -> load -> identical logits
    int4 = models["INT4"]
    ids = zoo.tokenizer(DEMO_PROMPT, return_tensors="pt")["input_ids"]
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        lowbit.save(int4, f"{d}/smollm2-w4g64", tokenizer=zoo.tokenizer)
        back = lowbit.load(f"{d}/smollm2-w4g64")
        same = torch.equal(int4(ids).logits, back(ids).logits)
    say(f"\nsave -> load (w4g64): logits {'identical' if same else 'DIFFER'}")
    if not same:
        raise SystemExit("save/load round trip changed the logits")
    return rows
