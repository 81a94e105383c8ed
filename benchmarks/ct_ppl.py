"""compressed-tensors exports loaded by transformers (CPU): perplexity equal to lowbit's (issue 15).

SmolLM2-135M quantized by lowbit (round-to-nearest; the export carries whatever method made the
codes), exported with ``lowbit.export(model, "compressed-tensors", dir)``, loaded with
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` (float32; asymmetric layouts with
``CompressedTensorsConfig(dequantize=True)``, which transformers 5 needs for them,
llm-compressor#1618), and both scored by ``lowbit.evaluate.domains.domain_perplexities`` (4,096
eval tokens per domain, windows of 512). W8A8 (``int-quantized``): transformers runs the int8
weights with float activations on CPU (compressed-tensors' CPU path has no int8 activation
kernel), lowbit rounds its activations to int8 per token, so that row differs by the activation
rounding and says so.

    python benchmarks/ct_ppl.py

Results: ``benchmarks/results/ct_ppl.json``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ct_ppl.json"
SCHEMES = ("w4g64", "w4g128", "w4g64-asym", "w8", "w8a8")


def main() -> None:
    import torch
    import transformers

    import lowbit
    from lowbit.evaluate.domains import domain_perplexities
    from lowbit.models.zoo import load_model

    zoo = load_model("smollm2-135m")
    rows = []
    for spec in SCHEMES:
        m = lowbit.quantize(copy.deepcopy(zoo.model), spec, progress=False)
        ours = {d: r.ppl for d, r in domain_perplexities(m, zoo.tokenizer).items()}
        with tempfile.TemporaryDirectory() as tmp:
            rep = lowbit.export(m, "compressed-tensors", Path(tmp) / "ct", tokenizer=zoo.tokenizer)
            opts = {}
            if spec.endswith("asym"):
                opts["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "ct"), dtype=torch.float32, **opts)
            theirs = {d: r.ppl for d, r in domain_perplexities(hf, zoo.tokenizer).items()}
        worst = max(abs(theirs[d] / ours[d] - 1) for d in ours)
        rows.append({"scheme": spec, "formats": rep.counts(), "export_bytes": rep.nbytes,
                     "lowbit": {d: round(v, 4) for d, v in ours.items()},
                     "transformers": {d: round(v, 4) for d, v in theirs.items()},
                     "max_rel_diff": worst})  # fmt: skip
        print(spec, f"max relative difference {100 * worst:.4f}%", flush=True)
        del m, hf
    RESULTS.write_text(json.dumps({"rows": rows, "transformers": transformers.__version__,
                                   "command": "python benchmarks/ct_ppl.py"}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
