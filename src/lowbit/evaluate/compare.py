"""Measure one model variant against its float original: size, accuracy, speed.

One function per task kind; each returns a flat dict of figures so the CLI, the demo and the
benchmark scripts print the same numbers from the same code.
"""

from __future__ import annotations

import torch

from .classification import accuracy
from .perplexity import perplexity
from .size import size_of
from .speed import decode_speed

__all__ = ["measure", "DEMO_PROMPT"]

DEMO_PROMPT = "The Python programming language is"


def measure(
    model,
    zoo,
    *,
    label: str,
    max_tokens: int = 8192,
    seqlen: int = 512,
    speed: bool = True,
    new_tokens: int = 32,
    reps: int = 3,
    progress: bool = False,
    reference: torch.nn.Module | None = None,
    images: int = 256,
) -> dict:
    """Figures for ``model`` (a variant of zoo model ``zoo``): size, quality, and speed.

    Causal LMs: perplexity on the held-out text, decode tokens/s and a greedy completion of
    :data:`DEMO_PROMPT`. Classifiers (digits-cnn): test accuracy. ImageNet classifiers: top-1
    agreement with ``reference`` (the FP32 model) where it is confident, and mean KL, on ``images``
    eval-split photo crops; images/s at batch 16.
    """
    size = size_of(model)
    row: dict = {
        "variant": label,
        "bytes": size.total_bytes,
        "linear_bpw": size.quantized_bits_per_weight if size.quantized else 32.0,
        "quantized_bytes": size.quantized_bytes,
        "quantized_numel": size.quantized_numel,
        "compression": size.quantized_compression if size.quantized else 1.0,
    }
    if zoo.task == "causal-lm":
        r = perplexity(model, zoo.tokenizer, max_tokens=max_tokens, seqlen=seqlen, progress=progress)
        row.update(ppl=r.ppl, ppl_tokens=r.tokens, text=r.source)
        if speed:
            d = decode_speed(model, zoo.tokenizer, DEMO_PROMPT, new_tokens=new_tokens, reps=reps, progress=progress)
            row.update(tok_s=d.tokens_per_s, completion=d.text, decoder=d.decoder)
    elif zoo.task == "classifier":
        from ..models.zoo import digits_data

        data = digits_data()
        row.update(accuracy=accuracy(model, data["x_test"], data["y_test"]))
    elif zoo.task == "image-classifier":
        from .classification import confident_agreement, logits_of
        from .images import photo_crops
        from .speed import median_time

        x = photo_crops(images, split="eval")
        ref = logits_of(reference if reference is not None else model, x)
        r = confident_agreement(ref, logits_of(model, x))
        row.update(agreement=r["agreement"], agreement_all=r["agreement_all"], kl=r["mean_kl"], images=images)
        if speed:
            batch = x[:16]
            with torch.no_grad():
                row["img_s"] = 16 / median_time(lambda: model(batch), reps=max(3, reps), warmup=1)
    row["threads"] = torch.get_num_threads()
    return row
