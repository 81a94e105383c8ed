"""Several bodies of English text that arrive offline, each split into disjoint parts, for
accuracy claims that hold beyond one kind of text.

Domains (name: what, where it comes from):

* ``python-docs``: Python's documentation, technical prose and code (Debian ``python3.11-doc``;
  :mod:`lowbit.evaluate.data`, whose document-level split it keeps).
* ``licences``: software licences, legal prose (``/usr/share/common-licenses``, Debian's
  ``base-files``: present on every Debian system).
* ``handbook``: The Debian Administrator's Handbook, a book on running Linux systems (Debian
  ``debian-handbook``, English HTML; text extracted with the stdlib's HTML parser).
* ``quotes``: quotations, jokes, poems and literary snippets (Debian ``fortunes``).

Splits. Outside ``python-docs`` a domain's text is cut into paragraphs (blank-line separated;
each fortune is one); paragraphs are de-duplicated across the domain by their whitespace- and
case-normalised text (the licences repeat whole sections between versions), then each goes to
``eval`` when the CRC-32 of its normalised text is 0-3 mod 10, ``calib`` at 4-7 and ``train``
at 8-9, in file order. So a paragraph never appears in two splits, and the split of a paragraph
does not move when others are added or removed.

:func:`calibration_batches` draws windows from one domain, several, or ``"mixed"`` (every
available domain, equal tokens from each): lowbit's default calibration set.
"""

from __future__ import annotations

import html.parser
import re
import zlib
from functools import lru_cache
from pathlib import Path

import torch

from . import data

__all__ = ["DOMAINS", "MIXED", "available_domains", "domain_text", "domain_token_ids", "domain_sentences", "calibration_batches",
           "max_calibration_samples", "domain_perplexities", "missing_reason", "DataError"]  # fmt: skip

DataError = data.DataError
MIXED = "mixed"

LICENCES = Path("/usr/share/common-licenses")
HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
FORTUNES = Path("/usr/share/games/fortunes")
_FORTUNE_SKIP = {"ascii-art", "art"}  # pictures drawn in characters, not text

# name -> (what, the Debian package that provides it)
DOMAINS: dict[str, tuple[str, str]] = {
    "python-docs": ("Python documentation (technical prose and code)", "python3.11-doc"),
    "licences": ("software licences (legal prose)", "base-files"),
    "handbook": ("The Debian Administrator's Handbook (a book on system administration)", "debian-handbook"),
    "quotes": ("quotations, jokes, poems (fortune cookies)", "fortunes"),
}


class _Text(html.parser.HTMLParser):
    """Visible text of an HTML page, block elements as paragraph breaks."""

    BLOCKS = {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "dt", "dd", "table", "br"}
    SKIP = {"script", "style", "head", "title", "nav"}

    def __init__(self) -> None:
        super().__init__()
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCKS:
            self.out.append("\n\n")

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.out.append("\n\n")

    def handle_data(self, d) -> None:
        if not self.skip:
            self.out.append(d)


def _html_text(path: Path) -> str:
    p = _Text()
    p.feed(path.read_text(errors="replace"))
    return "".join(p.out)


def _files(name: str) -> list[tuple[str, str]]:
    """(file name, text) of a domain other than python-docs, in sorted order; [] when absent."""
    if name == "licences":
        if not LICENCES.is_dir():
            return []
        return [(f.name, f.read_text(errors="replace")) for f in sorted(LICENCES.iterdir()) if f.is_file()]
    if name == "handbook":
        if not HANDBOOK.is_dir():
            return []
        return [(f.name, _html_text(f)) for f in sorted(HANDBOOK.glob("*.html"))]
    if name == "quotes":
        if not FORTUNES.is_dir():
            return []
        files = [f for f in sorted(FORTUNES.iterdir()) if f.is_file() and not f.suffix and f.name not in _FORTUNE_SKIP]
        # one fortune per paragraph: the '%' separators become blank lines
        return [(f.name, re.sub(r"(?m)^%\s*$", "\n", f.read_text(errors="replace"))) for f in files]
    raise KeyError(name)


def _normal(p: str) -> str:
    return " ".join(p.lower().split())


def _split_of(norm: str) -> str:
    r = zlib.crc32(norm.encode()) % 10
    return "eval" if r <= 3 else "calib" if r <= 7 else "train"


@lru_cache(maxsize=8)
def _paragraphs(name: str) -> tuple[tuple[str, str], ...]:
    """(split, paragraph) of a domain, de-duplicated, in file order."""
    seen: set[str] = set()
    out = []
    for _, text in _files(name):
        for para in re.split(r"\n\s*\n", text):
            para = "\n".join(line.rstrip() for line in para.strip("\n").splitlines()).strip()
            norm = _normal(para)
            if len(norm) < 20 or norm in seen:  # headings, page furniture, repeats
                continue
            seen.add(norm)
            out.append((_split_of(norm), para))
    return tuple(out)


def _known(name: str) -> str:
    if name not in DOMAINS:
        raise DataError(f"unknown text domain {name!r}; domains: {', '.join(DOMAINS)}, or {MIXED!r}")
    return name


def missing_reason(name: str) -> str | None:
    """Why domain ``name`` has no text here (the package to install), or None."""
    _known(name)
    if name == "python-docs":
        return None  # falls back to the stdlib's pydoc_data text
    if _paragraphs(name):
        return None
    return f"{name}: no text here (install the Debian package {DOMAINS[name][1]}: apt-get install {DOMAINS[name][1]})"


def available_domains() -> list[str]:
    """The domains whose text is present on this machine, in :data:`DOMAINS` order."""
    return [d for d in DOMAINS if missing_reason(d) is None]


@lru_cache(maxsize=32)
def domain_text(name: str, split: str) -> str:
    """The text of one split (``eval``, ``calib``, ``train``) of domain ``name``, paragraphs joined
    by blank lines. Raises :class:`DataError` for an unknown domain or split, or one absent here."""
    if split not in data.SPLITS:
        raise DataError(f"unknown split {split!r}; splits: {', '.join(data.SPLITS)}")
    reason = missing_reason(name)
    if reason:
        raise DataError(reason)
    if name == "python-docs":
        return data.text_split(split)
    return "\n\n".join(p for s, p in _paragraphs(name) if s == split)


def domain_token_ids(tokenizer, name: str, split: str = "eval", max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``(n,)`` long of one split of domain ``name`` (its first ``max_tokens`` if given)."""
    return data.cached_token_ids(tokenizer, ("domain", name, split), lambda: domain_text(name, split), max_tokens)


def domain_sentences(name: str, split: str = "eval", n: int | None = None, seed: int | None = None,
                     min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentences of one split of domain ``name`` (for sentence encoders): the text's whitespace
    normalised, cut after ``.``, ``!`` or ``?``, kept when ``min_words``..``max_words`` long; the
    first ``n`` in text order, or with ``seed`` ``n`` drawn by a seeded choice. Raises
    :class:`DataError` as :func:`domain_text` does, or when fewer than ``n`` exist."""
    text = " ".join(domain_text(name, split).split())
    found = [t for t in re.split(r"(?<=[.!?])\s+", text) if min_words <= len(t.split()) <= max_words]
    if n is None:
        return found
    if len(found) < n:
        raise DataError(f"the {split} split of {name!r} holds {len(found)} sentences of {min_words}-{max_words} words, "
                        f"fewer than {n}")  # fmt: skip
    if seed is None:
        return found[:n]
    idx = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed))[:n]
    return [found[i] for i in sorted(idx.tolist())]


def domain_perplexities(model, tokenizer, domains: str | tuple[str, ...] | list[str] | None = None, *,
                        max_tokens: int = 4096, seqlen: int = 512) -> dict:
    """Perplexity of a causal LM on the ``eval`` split of each domain (default: every domain present
    here), each scored as :func:`lowbit.evaluate.perplexity.perplexity` does (the first
    ``max_tokens`` tokens of the split, non-overlapping windows of ``seqlen``).

    Returns ``{domain: PerplexityResult}`` in the order given (:data:`DOMAINS` order by default). Raises :class:`DataError` for
    unknown or absent domains, or a split shorter than ``max_tokens`` tokens (so every domain is
    scored on the same number of tokens)."""
    from .perplexity import perplexity

    names = available_domains() if domains is None else _resolve(domains, ())
    out = {}
    for d in names:
        have = len(domain_token_ids(tokenizer, d, "eval", max_tokens))
        if have < max_tokens:
            raise DataError(f"the eval split of {d!r} holds {have} tokens, fewer than max_tokens={max_tokens}")
    for d in names:
        # a prefix of the split long enough for max_tokens tokens (English runs ~4 characters a token)
        out[d] = perplexity(model, tokenizer, text=domain_text(d, "eval")[: max_tokens * 8], max_tokens=max_tokens,
                            seqlen=seqlen, source=d)  # fmt: skip
        if out[d].windows < max_tokens // seqlen:  # a split of more than 8 characters a token
            raise DataError(f"the eval split of {d!r}: {max_tokens * 8} characters held fewer than {max_tokens} tokens")
    return out


def _resolve(domains: str | tuple[str, ...] | list[str], exclude: tuple[str, ...]) -> list[str]:
    names = [domains] if isinstance(domains, str) else list(domains)
    if names == [MIXED]:
        names = available_domains()
    for n in names + list(exclude):
        _known(n)
    names = [n for n in names if n not in exclude]
    if not names:
        raise DataError("no text domain left to calibrate on")
    return names


def max_calibration_samples(
    tokenizer,
    domains: str | tuple[str, ...] | list[str] = MIXED,
    *,
    seqlen: int = 512,
    split: str = "calib",
    exclude: tuple[str, ...] = (),
    text: str | None = None,
) -> int:
    """The largest ``nsamples`` for which :func:`calibration_batches` with the same arguments can
    draw its windows of ``seqlen`` tokens without overlap (0 when none fits). Raises
    :class:`DataError` for unknown or absent domains."""
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2, got {seqlen}")
    if text is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) // seqlen
    names = _resolve(domains, tuple(exclude))
    fits = [len(domain_token_ids(tokenizer, n, split)) // seqlen for n in names]
    k, low = len(fits), min(fits)
    # equal shares, the first n % k domains one more: k * low always fits; one more per leading
    # domain while each of them still holds low + 1 windows
    extra = next((i for i, f in enumerate(fits) if f <= low), k)
    return k * low + extra


def calibration_batches(
    tokenizer,
    domains: str | tuple[str, ...] | list[str] = MIXED,
    *,
    nsamples: int = 64,
    seqlen: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    split: str = "calib",
    exclude: tuple[str, ...] = (),
    text: str | None = None,
) -> list[torch.Tensor]:
    """Calibration inputs for a language model: ``nsamples`` windows of ``seqlen`` tokens from the
    ``split`` part of ``domains`` (one name, several, or ``"mixed"``: every domain present here,
    lowbit's default), minus ``exclude``; equal numbers of windows from each domain (the first
    ``nsamples % len(domains)`` one more), drawn without overlap by a seeded choice, then shuffled
    together; as ``(batch_size, seqlen)`` token-id batches (the last may be smaller). ``text``:
    draw from this text instead (your own domain). Raises :class:`DataError` for unknown or
    absent domains, or when a domain (or ``text``) holds fewer tokens than its share needs."""
    if nsamples < 1 or seqlen < 2 or batch_size < 1:
        raise DataError(f"nsamples, batch_size must be >= 1 and seqlen >= 2; got {nsamples}, {batch_size}, {seqlen}")
    if text is not None:
        return data.calibration_batches(tokenizer, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, seed=seed,
                                        text=text)  # fmt: skip
    names = _resolve(domains, tuple(exclude))
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, name in enumerate(names):
        want = nsamples // len(names) + (1 if i < nsamples % len(names) else 0)
        if want == 0:
            continue
        ids = domain_token_ids(tokenizer, name, split)
        parts.append(data.windows(ids, want, seqlen, g, f"the {split} split of {name}"))
    allw = torch.cat(parts)[torch.randperm(nsamples, generator=g)]
    return [allw[i : i + batch_size] for i in range(0, nsamples, batch_size)]
