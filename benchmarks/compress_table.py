"""Compression beyond quantization on SmolLM2-135M (issue 16): each variant's stored bits per weight
of the decoder's linear layers, whole-model size, and perplexity on the eval split of every text
domain (calibration: lowbit's default mixed set, drawn from the calib splits only).

    python benchmarks/compress_table.py                    # every variant not yet measured
    python benchmarks/compress_table.py --only 2:4-sparsegpt-w4g64

Results go to benchmarks/results/sparse_smollm2.json (one entry per variant, kept across runs
for the same variant definition); ``report.py`` renders them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "sparse_smollm2.json"
TOKENS = 4096
CALIB = {"nsamples": 64, "seqlen": 512, "seed": 0}
DECODER = "model.layers."  # the decoder's linear layers: what "bits per weight" is over

# label -> (scheme, method, options); the embedding (tied LM head) stays as stored, float
VARIANTS: dict[str, tuple[str | None, str, dict]] = {
    "fp32": (None, "fp32", {}),
    "w4g64-gptq": ("w4g64", "gptq", {}),
    "w3g64-gptq": ("w3g64", "gptq", {}),
    "int8-2:4-sparsegpt": ("int8", "sparsegpt", {"nm": "2:4"}),  # int8 keeps are near-lossless: pruning's own cost
    "2:4-wanda-w4g64": ("w4g64", "wanda", {"nm": "2:4"}),
    "2:4-sparsegpt-w4g64": ("w4g64", "sparsegpt", {"nm": "2:4"}),
    "50%-sparsegpt-w4g128": ("w4g128", "sparsegpt", {"sparsity": 0.5}),
    "25%-sparsegpt-w3g64": ("w3g64", "sparsegpt", {"sparsity": 0.25}),
}


def run(label: str) -> dict:
    import lowbit
    from lowbit.evaluate.domains import calibration_batches, domain_perplexities
    from lowbit.models.zoo import load_model

    scheme, method, opts = VARIANTS[label]
    zoo = load_model("smollm2-135m")
    model = zoo.model
    t = time.perf_counter()
    if method != "fp32":
        recipe = lowbit.Recipe(default=None).add(DECODER + "*", scheme)
        cal = calibration_batches(zoo.tokenizer, nsamples=CALIB["nsamples"], seqlen=CALIB["seqlen"], seed=CALIB["seed"])
        model = lowbit.quantize(model, recipe, method=method, calibration=cal, **opts)
    seconds = time.perf_counter() - t
    size = lowbit.size_of(model)
    dec = [r for r in size.layers if r.name.startswith(DECODER)]
    numel, nbytes = sum(r.numel for r in dec), sum(r.bytes for r in dec)
    ppl = {d: r.ppl for d, r in domain_perplexities(model, zoo.tokenizer, max_tokens=TOKENS).items()}
    return {"scheme": scheme, "method": method, "options": opts, "decoder_bits_per_weight": 8 * nbytes / numel,
            "decoder_ratio_vs_fp32": 4 * numel / nbytes, "model_bytes": size.total_bytes,
            "fp32_model_bytes": 4 * size.total_params, "ppl": ppl, "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", help="variants to (re)measure")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for label in args.only or list(VARIANTS):
        spec = list(VARIANTS[label][:2]) + [VARIANTS[label][2]]
        if not args.only and label in done and done[label].get("spec") == spec:
            continue
        r = run(label)
        done[label] = {"spec": spec, **r}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(done, indent=1) + "\n")
        print(label, json.dumps({k: r[k] for k in ("decoder_bits_per_weight", "ppl", "seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
