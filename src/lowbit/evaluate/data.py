"""Offline text for perplexity and calibration, split into disjoint parts.

Source: Debian's ``python3.11-doc`` reST sources (``/usr/share/doc/python3.11/html/_sources``,
about 11 MB of English technical prose); where that package is absent, the stdlib's
``pydoc_data.topics`` (about 0.8 MB, the same kind of text). Results always name the source they
used, since perplexities on the two differ.

Splits are by document, fixed and disjoint: a document goes to ``eval`` when the CRC-32 of its
name is 0 mod 10, to ``calib`` when it is 1 mod 10, and to ``train`` otherwise. Documents are
joined in sorted-name order with blank lines between them.
"""

from __future__ import annotations

import hashlib
import weakref
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["text_split", "text_source", "token_ids", "cached_token_ids", "windows", "calibration_batches", "CalibrationBatches", "SPLITS",
           "DataError"]  # fmt: skip

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
SPLITS = ("eval", "calib", "train")


class DataError(ValueError):
    """Not enough text for what was asked."""


def _split_of(name: str) -> str:
    r = zlib.crc32(name.encode()) % 10
    return "eval" if r == 0 else "calib" if r == 1 else "train"


@lru_cache(maxsize=1)
def _documents() -> tuple[str, tuple[tuple[str, str], ...]]:
    """(source name, sorted (doc name, text) pairs)."""
    files = sorted(DOC_ROOT.rglob("*.rst.txt")) if DOC_ROOT.is_dir() else []
    if files:
        docs = tuple((str(f.relative_to(DOC_ROOT)), f.read_text(errors="replace")) for f in files)
        return "python3.11-doc", docs
    from pydoc_data.topics import topics

    return "pydoc_data.topics", tuple(sorted(topics.items()))


def text_source() -> str:
    """Which text is in use: ``python3.11-doc`` or ``pydoc_data.topics``."""
    return _documents()[0]


@lru_cache(maxsize=4)
def text_split(split: str) -> str:
    """The concatenated text of one split (``eval``, ``calib`` or ``train``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    _, docs = _documents()
    return "\n\n".join(text for name, text in docs if _split_of(name) == split)


# per tokenizer object (weakly held: it goes with the tokenizer), then per text and length. Keyed
# by the object, not its name: two tokenizers of one name can split text differently (options).
_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_token_ids(tokenizer, name: tuple, text: Callable[[], str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``(n,)`` long of the text ``text()`` returns (its first ``max_tokens`` tokens if
    given), kept per tokenizer object and ``name`` so each text is tokenized once per tokenizer
    (a tokenizer that cannot be weakly referenced tokenizes every time)."""
    key = (*name, max_tokens or -1)
    try:
        cache = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weakly referenceable or not hashable
        cache = {}
    if key not in cache:
        t = text()
        if max_tokens:
            t = t[: max_tokens * 8]  # >= 2 characters per token in every text here
        ids = tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        cache[key] = ids[:max_tokens] if max_tokens else ids
    return cache[key]


def token_ids(tokenizer, split: str = "eval", max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``(n,)`` long of a split's text (first ``max_tokens`` tokens if given)."""
    return cached_token_ids(tokenizer, (split,), lambda: text_split(split), max_tokens)


def windows(ids: torch.Tensor, n: int, seqlen: int, generator: torch.Generator, what: str) -> torch.Tensor:
    """``n`` non-overlapping windows ``(n, seqlen)`` of ``ids``, a seeded choice among all of them.
    Raises :class:`DataError` naming ``what`` when ``ids`` holds too few tokens."""
    need = n * seqlen
    if len(ids) < need:
        raise DataError(
            f"{what} has {len(ids)} tokens; {n} samples of {seqlen} need at least {need} "
            "(ask for fewer or shorter samples, or give more text)"
        )
    n_windows = len(ids) // seqlen
    pick = torch.randperm(n_windows, generator=generator)[:n]
    return ids[: n_windows * seqlen].reshape(n_windows, seqlen)[pick]


class CalibrationBatches(list):
    """The token-id batches of a calibration set (a list of ``(batch, seqlen)`` long tensors), with
    ``provenance``: what they were drawn from (domains or a text's SHA-256, split, sizes, seed).
    :func:`lowbit.quantize` records it in ``model.lowbit_calibration`` and :func:`lowbit.save` in
    the manifest, so a saved model says what it was calibrated on."""

    def __init__(self, batches, provenance: dict) -> None:
        super().__init__(batches)
        self.provenance = dict(provenance)


def calibration_batches(
    tokenizer,
    *,
    nsamples: int = 64,
    seqlen: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    split: str = "calib",
    text: str | None = None,
) -> list[torch.Tensor]:
    """``nsamples`` windows of ``seqlen`` tokens drawn (seeded) from the calibration split, or from
    ``text`` when given, as token-id batches ``(batch_size, seqlen)`` (the last may be smaller), in a
    :class:`CalibrationBatches` list whose ``provenance`` names the source (a text by its SHA-256).

    Raises :class:`DataError` when the text holds fewer than ``nsamples * seqlen`` tokens.
    """
    if nsamples < 1 or seqlen < 2 or batch_size < 1:
        raise DataError(f"nsamples, batch_size must be >= 1 and seqlen >= 2; got {nsamples}, {batch_size}, {seqlen}")
    if text is None:
        ids, what = token_ids(tokenizer, split), f"the {split} split of {text_source()}"
        source = {"source": text_source(), "split": split}
    else:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        what = "the calibration text"
        source = {"text_sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
                  "text_characters": len(text)}  # fmt: skip
    w = windows(ids, nsamples, seqlen, torch.Generator().manual_seed(seed), what)
    return CalibrationBatches([w[i : i + batch_size] for i in range(0, nsamples, batch_size)],
                              {**source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed})  # fmt: skip
