"""Perplexity of a causal LM on the held-out text split.

The split's first ``max_tokens`` tokens are cut into non-overlapping windows of ``seqlen``; each
window is scored independently (no context carried across windows), and perplexity is
``exp(mean negative log-likelihood)`` over every predicted token (``seqlen - 1`` per window).
Same windows, same model code for every variant: differences are the quantization's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import DataError, text_source, token_ids

__all__ = ["perplexity", "PerplexityResult"]


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int  # predicted tokens scored
    windows: int
    seqlen: int
    source: str

    def __str__(self) -> str:
        return f"ppl {self.ppl:.3f} ({self.tokens} tokens, {self.windows}x{self.seqlen}, {self.source})"


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    *,
    split: str = "eval",
    seqlen: int = 512,
    max_tokens: int = 16384,
    batch_size: int = 4,
    progress: bool = False,
    text: str | None = None,
    source: str | None = None,
    kv_cache: str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``split`` (see the module docstring), or on ``text`` when given
    (its first ``max_tokens`` tokens; ``source`` names it in the result). ``kv_cache``
    (``"float32"`` or ``"int8"``): run each window through :class:`lowbit.generate.Decoder` with
    that key/value cache instead of the model's forward (Llama-family models); otherwise the
    windows go to the device of the model's first parameter. Raises
    :class:`DataError` for text shorter than one window, ``seqlen`` beyond the model's
    ``config.max_position_embeddings``, or a model whose output has no logits (an encoder)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        raise DataError(f"seqlen {seqlen} is longer than the model's context of {context} positions; "
                        "perplexity beyond it measures extrapolation, not the model: use seqlen <= context")  # fmt: skip
    if text is not None:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
        split = "given text"
    else:
        ids = token_ids(tokenizer, split, max_tokens)
    n_windows = len(ids) // seqlen
    if n_windows == 0:
        raise DataError(f"the {split} split has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    total_nll = 0.0
    count = 0
    batches = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    model.eval()
    # the model's device (a model on an accelerator is fed there); a model without parameters: CPU
    device = next((p.device for p in model.parameters()), torch.device("cpu")) if kv_cache is None else None
    for i in batches:
        x = windows[i : i + batch_size] if device is None else windows[i : i + batch_size].to(device)
        if kv_cache is None:
            out = model(input_ids=x, use_cache=False)
            if not isinstance(getattr(out, "logits", None), torch.Tensor):
                raise DataError(f"perplexity needs a causal language model (an output with logits); "
                                f"{type(model).__name__} returned {type(out).__name__} without them")  # fmt: skip
            logits = out.logits.float()  # (b, seqlen, vocab)
        else:
            from ..generate import Decoder

            logits = torch.stack([Decoder(model, seqlen, kv_cache).feed(w, all_logits=True) for w in x])
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        count += x[:, 1:].numel()
    mean = total_nll / count
    name = text_source() if text is None else (source or "given text")
    return PerplexityResult(math.exp(mean), mean, count, n_windows, seqlen, name)
