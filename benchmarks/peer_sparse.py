"""llm-compressor's 2:4 pruning recipes on SmolLM2-135M (issue 16's peer cells), scored by the
harness of ``compress_models.py --models smollm2`` so the rows sit beside lowbit's:

    make peers-llmc
    /work/peers/llmc/bin/python benchmarks/peer_sparse.py [--only sparsegpt-2:4 ...]

Every job runs in a fresh child process (its own peak RSS):

1. ``lowbit.models.zoo.load_model("smollm2-135m")`` (float32), the 210 decoder ``nn.Linear``
   layers as targets (``lm_head`` ignored; the embedding is not a Linear).
2. ``llmcompressor.oneshot`` with the job's recipe on exactly the windows lowbit's SmolLM2
   compress rows calibrate on: ``calibration_batches(tok, "mixed", nsamples=64, seqlen=512, seed=0)``.
3. Size: the model saved the way llm-compressor ships it (``save_pretrained(save_compressed=True)``,
   compressed-tensors); the decoder layers' bits per weight are the bytes of every tensor stored for
   them (values, masks or indices, scales, zero points) over their weight count, read from the
   safetensors headers; the file is every ``*.safetensors`` file written.
4. Accuracy: the effective weights (pruned; fake-quantized with the module's own scale and zero point
   where the recipe quantizes) copied into a fresh float32 model, perplexity on 4096 held-out tokens
   of every domain's eval split (``lowbit.evaluate.domains.domain_perplexities``), as lowbit's rows.

Results: benchmarks/results/peer_sparse_smollm2.json (one row per job, replaced on rerun);
``report.py`` puts them under lowbit's SmolLM2 compression table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_algorithms as pa  # noqa: E402  (shared loaders, targets, calibration, scoring)

OUT = Path(__file__).resolve().parent / "results" / "peer_sparse_smollm2.json"
CALIB = {"calib_domain": "mixed", "seed": 0, "calib_samples": 64}

# label -> (pruning modifier, its arguments, quantization: None | "rtn" | "gptq"), weights W4 group 64
JOBS: dict[str, tuple[str, dict, str | None]] = {
    "sparsegpt-2:4": ("SparseGPTModifier", {"sparsity": 0.5, "mask_structure": "2:4"}, None),
    "sparsegpt-2:4 + gptq-w4g64": ("SparseGPTModifier", {"sparsity": 0.5, "mask_structure": "2:4"}, "gptq"),
    "wanda-2:4 + rtn-w4g64": ("WandaPruningModifier", {"sparsity": 0.5, "mask_structure": "2:4"}, "rtn"),
}
GROUP = 64  # llm-compressor requires columns % group_size == 0: SmolLM2's 576 columns take 64, not 128


def _recipe(job: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    prune, kw, quant = JOBS[job["label"]]
    cls = {"SparseGPTModifier": SparseGPTModifier, "WandaPruningModifier": WandaPruningModifier}[prune]
    recipe = [cls(targets=["Linear"], ignore=["lm_head"], **kw)]
    if quant:
        wargs = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=wargs)}
        mod = GPTQModifier if quant == "gptq" else QuantizationModifier
        recipe.append(mod(config_groups=groups, ignore=["lm_head"]))
    return recipe


def _stored(directory: Path, targets: dict) -> tuple[int, int, dict]:
    """(decoder Linear bytes, all safetensors bytes, the quantization / sparsity config) of a saved model."""
    from safetensors import safe_open

    dec = 0
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            dec += sum(st.get_tensor(k).nbytes for k in st.keys() if k.rpartition(".")[0] in targets)
    cfg = json.loads((directory / "config.json").read_text()).get("quantization_config", {})
    return dec, sum(f.stat().st_size for f in files), cfg


def run_child(job: dict) -> dict:
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(pa.THREADS)
    model, tok = pa._load()
    if not torch.accelerator.is_available():  # as in peer_algorithms: CPU-only torch cannot pin memory
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    calib = pa._calib(tok, {**CALIB, **job})
    loader = DataLoader([{"input_ids": c} for c in calib], batch_size=1,
                        collate_fn=lambda b: {"input_ids": b[0]["input_ids"][None],
                                              "attention_mask": torch.ones(1, pa.SEQLEN, dtype=torch.long)})
    recipe = _recipe(job)
    t = time.perf_counter()
    qmodel = oneshot(model=model, tokenizer=tok, dataset=loader, recipe=recipe,
                     num_calibration_samples=CALIB["calib_samples"], max_seq_length=pa.SEQLEN,
                     shuffle_calibration_samples=False) or model  # fmt: skip
    seconds = time.perf_counter() - t
    peak = pa._rss_mb()
    fresh, _ = pa._load()
    targets = pa._targets(fresh)
    qmods = dict(qmodel.named_modules())
    sd = qmodel.state_dict()
    zeros = total = broken = 0
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            mod, _, pname = name.rpartition(".")
            w = sd[name].float()
            if mod in targets and pname == "weight":
                m = qmods[mod]
                if hasattr(m, "weight_scale"):
                    w = fake_quantize(w, m.weight_scale.float(), m.weight_zero_point, m.quantization_scheme.weights)
                zeros, total = zeros + int((w == 0).sum()), total + w.numel()
                broken += int(((w.reshape(-1, 4) != 0).sum(1) > 2).sum())  # groups of 4 keeping more than 2
            p.copy_(w.to(p.dtype))
    with tempfile.TemporaryDirectory() as d:
        qmodel.save_pretrained(d, save_compressed=True)
        dec_bytes, file_bytes, qcfg = _stored(Path(d), targets)
    ppl, eval_s = pa._domain_ppl(fresh, tok, 4096)
    fmt = {"quantization": qcfg.get("format"), "sparsity": (qcfg.get("sparsity_config") or {}).get("format")}
    return {"label": job["label"], "peer": "llm-compressor", "version": pa._version("llmcompressor"),
            "recipe": " + ".join(type(m).__name__ for m in recipe), "args": JOBS[job["label"]][1],
            "decoder_bpw": 8 * dec_bytes / total, "file_bytes": file_bytes, "saved_format": fmt,
            "decoder_sparsity": zeros / total, "groups_of_4_over_2": broken, "ppl": ppl, "seconds": seconds,
            "eval_seconds": eval_s, "peak_rss_mb": round(peak, 1), "threads": pa.THREADS,
            "calib": pa._calib_desc({**CALIB, **job}),
            "env": f"torch {pa._version('torch')}, transformers {pa._version('transformers')}, "
                   f"compressed-tensors {pa._version('compressed-tensors')}"}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(JOBS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.child:
        args.out.write_text(json.dumps(run_child(json.loads(args.child))))
        return 0
    for label in args.only or list(JOBS):
        print(f"== llm-compressor | {label}", flush=True)
        row, rc, _ = pa.run_in_child(__file__, {"label": label})
        if row is None:
            raise SystemExit(f"{label}: the child exited with {rc}")
        rows = [r for r in (json.loads(args.out.read_text()) if args.out.exists() else []) if r["label"] != label]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows + [row], indent=1) + "\n")
        print("   ->", json.dumps({k: row[k] for k in ("decoder_bpw", "decoder_sparsity", "ppl", "seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
