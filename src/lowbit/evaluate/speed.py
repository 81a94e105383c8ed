"""Speed measurements: batch-1 greedy decode tokens/s, and a timing helper for kernels.

Figures are medians over repetitions, measured in-process; compare ratios taken in one run,
never absolute times across runs (DESIGN.md, "Measuring").
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["median_time", "median_times_interleaved", "decode_speed", "DecodeResult", "greedy_generate", "lean_greedy"]


def median_time(fn: Callable[[], object], *, reps: int = 20, warmup: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def median_times_interleaved(fns: list[Callable[[], object]], *, reps: int = 20, warmup: int = 3) -> list[float]:
    """Median wall seconds of each ``fns[i]()``, timed round-robin (one call of each per round),
    so that a machine's drift over the run affects every variant alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


@dataclass
class DecodeResult:
    tokens_per_s: float  # median over repetitions
    all_tokens_per_s: list[float]
    new_tokens: int
    prompt_tokens: int
    text: str
    decoder: str = "transformers"  # which decode loop ran: "lowbit" or "transformers"


def _cache_kw(model) -> str:
    """The forward() keyword of the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy batch-1 decoding with the KV cache: (generated ids ``(new_tokens,)``, decode seconds).

    The prompt's forward pass is excluded from the time; each later step feeds one token.
    """
    kw = _cache_kw(model)
    out = model(input_ids=input_ids, use_cache=True)
    past = _cache_of(out)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    ids = [nxt]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
        past = _cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(nxt)
    return torch.cat(ids, dim=1)[0], time.perf_counter() - t


@torch.no_grad()
def lean_greedy(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """As :func:`greedy_generate`, through :class:`lowbit.generate.Decoder` (Llama family)."""
    from ..generate import Decoder

    dec = Decoder(model, input_ids.shape[-1] + new_tokens)
    nxt = int(dec.feed(input_ids.reshape(-1)).argmax())
    ids = [nxt]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = int(dec.feed(torch.tensor([nxt])).argmax())
        ids.append(nxt)
    return torch.tensor(ids), time.perf_counter() - t


def lean_supported(model) -> bool:
    """Whether :mod:`lowbit.generate` can decode ``model``."""
    from ..generate import GenerateError, _arch

    try:
        _arch(model)
    except GenerateError:
        return False
    return True


def decode_speed(
    model, tokenizer, prompt: str, *, new_tokens: int = 32, reps: int = 3, decoder: str = "auto",
    progress: bool = False,
) -> DecodeResult:
    """Batch-1 greedy decode speed (tokens/s, median of ``reps``, the prompt's pass excluded) and
    the completion text (``progress``: a progress bar on stderr). ``decoder``: ``"lowbit"`` (:mod:`lowbit.generate`), ``"transformers"``
    (the model's own forward with its KV cache, step by step), or ``"auto"`` (lowbit's where it
    runs the model)."""
    model.eval()
    if decoder == "auto":
        decoder = "lowbit" if lean_supported(model) else "transformers"
    run = lean_greedy if decoder == "lowbit" else greedy_generate
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    run(model, input_ids, 4)  # warm-up
    rates = []
    text = ""
    rounds = range(reps)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"decode {new_tokens} tokens ({decoder})", unit="run")
    for _ in rounds:
        ids, secs = run(model, input_ids, new_tokens)
        rates.append((new_tokens - 1) / secs)
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return DecodeResult(statistics.median(rates), rates, new_tokens, input_ids.shape[1], text, decoder)
