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
does not move when others are added or removed. Near-duplicates do cross: the licences' versions
reword the same clauses (GPL, LGPL), so about 5% of their eval text has most of its 8-word
phrases in their calib split (python-docs 0.4%, quotes 1%, handbook none); lowbit's cross-domain
tables therefore never calibrate on licences, which stays an unseen evaluation domain.

:func:`calibration_batches` draws windows from one domain, several, or ``"mixed"`` (every
available domain, equal tokens from each, a short one topped up by the others): lowbit's default
calibration set.
"""

from __future__ import annotations

import html.parser
import operator
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
    if name == MIXED:
        raise DataError(f"{MIXED!r} stands for every domain; this takes one domain: {', '.join(DOMAINS)}")
    if name not in DOMAINS:
        if len(name) > 40 or "\n" in name:  # text passed where a name goes
            raise DataError(f"unknown text domain {name[:40]!r}... ({len(name)} characters): to calibrate on your "
                            "own text, pass it as text=")  # fmt: skip
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
    """Token ids ``(n,)`` long of one split of domain ``name`` (its first ``max_tokens`` if given,
    a positive integer)."""
    if max_tokens is not None:
        max_tokens = _ints(max_tokens=max_tokens)["max_tokens"]
        if max_tokens < 1:
            raise DataError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    return data.cached_token_ids(tokenizer, ("domain", name, split), lambda: domain_text(name, split), max_tokens)


def domain_sentences(name: str, split: str = "eval", n: int | None = None, seed: int | None = None,
                     min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentences of one split of domain ``name`` (for sentence encoders): the text's whitespace
    normalised, cut after ``.``, ``!`` or ``?``, kept when ``min_words``..``max_words`` long; the
    first ``n`` in text order, or with ``seed`` ``n`` drawn by a seeded choice. Raises
    :class:`DataError` as :func:`domain_text` does, for ``n`` not a non-negative integer or
    ``seed`` not an integer, or when fewer than ``n`` exist."""
    if n is not None:
        n = _ints(n=n)["n"]
        if n < 0:
            raise DataError(f"n must be >= 0, got {n}")
    if seed is not None:
        seed = _ints(seed=seed)["seed"]
        _seed_range(seed)
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
    here), each scored as :func:`lowbit.evaluate.perplexity.perplexity` does: the first
    ``max_tokens`` tokens of the split cut into ``max_tokens // seqlen`` non-overlapping windows of
    ``seqlen`` tokens (a remainder shorter than a window is not scored), every token after a
    window's first one predicted. The model is left in ``eval()`` mode.

    Returns ``{domain: PerplexityResult}`` in the order given (:data:`DOMAINS` order by default):
    ``ppl`` = exp(``nll``), ``nll`` the mean negative log-likelihood in nats per predicted token,
    ``tokens`` the predicted tokens scored (``windows * (seqlen - 1)``). Raises :class:`DataError`
    for unknown or absent domains, a model that is no causal LM, non-integer sizes, ``seqlen < 2``
    or ``max_tokens < seqlen``, a ``seqlen`` beyond the model's context, or a split shorter than
    ``max_tokens`` tokens (so every domain is scored on the same number of tokens)."""
    from .perplexity import perplexity

    max_tokens, seqlen = _ints(max_tokens=max_tokens, seqlen=seqlen).values()
    if seqlen < 2 or max_tokens < seqlen:
        raise DataError(f"need 2 <= seqlen <= max_tokens; got seqlen={seqlen}, max_tokens={max_tokens}")
    names = available_domains() if domains is None else _resolve(domains, (), "score")
    out = {}
    for d in names:
        have = len(domain_token_ids(tokenizer, d, "eval", max_tokens))
        if have < max_tokens:
            raise DataError(f"the eval split of {d!r} holds {have} tokens, fewer than max_tokens={max_tokens}")
    for d in names:
        # a prefix of the split long enough for max_tokens tokens (English runs ~4 characters a token)
        out[d] = perplexity(model, tokenizer, text=domain_text(d, "eval")[: max_tokens * 8], max_tokens=max_tokens,
                            seqlen=seqlen, source=_source(d))  # fmt: skip
        if out[d].windows < max_tokens // seqlen:  # a split of more than 8 characters a token
            raise DataError(f"the eval split of {d!r}: {max_tokens * 8} characters held fewer than {max_tokens} tokens")
    return out


def _source(name: str) -> str:
    """The domain's name, and the text standing in for it where that is not its usual one."""
    if name == "python-docs" and data.text_source() != DOMAINS[name][1]:
        return f"{name} ({data.text_source()})"
    return name


def _resolve(
    domains: str | tuple[str, ...] | list[str], exclude: tuple[str, ...], what: str = "calibrate on"
) -> list[str]:
    names = list(dict.fromkeys(_names(domains, "domains")))  # a name given twice is one domain
    if names == [MIXED]:
        names = available_domains()
    elif MIXED in names:
        raise DataError(f"{MIXED!r} means every domain present here; it does not combine with other names")
    for n in names + list(exclude):
        _known(n)
    names = [n for n in names if n not in exclude]
    if not names:
        raise DataError(f"no text domain left to {what}")
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
    :class:`DataError` for unknown or absent domains, a ``seqlen`` that is not an integer >= 2, or
    ``text`` together with domains."""
    seqlen = _ints(seqlen=seqlen)["seqlen"]
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2, got {seqlen}")
    _text_or_domains(domains, exclude, text)
    if text is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) // seqlen
    names = _resolve(domains, _names(exclude, "exclude"))
    return sum(len(domain_token_ids(tokenizer, n, split)) // seqlen for n in names)


def _ints(**values) -> dict[str, int]:
    """Each value as a Python int (numpy integers welcome; bools and floats refused)."""
    out = {}
    for what, v in values.items():
        if isinstance(v, bool):
            raise DataError(f"{what} must be an integer, got {v!r}")
        try:
            out[what] = operator.index(v)
        except TypeError:
            raise DataError(f"{what} must be an integer, got {v!r}") from None
    return out


def _seed_range(seed: int) -> None:
    if not -(2**63) <= seed < 2**64:  # torch.Generator.manual_seed's range
        raise DataError(f"seed must be in [-2**63, 2**64), got {seed}")


def _text_or_domains(domains, exclude, text) -> None:
    if text is not None and (_names(domains, "domains") not in ((MIXED,), ()) or exclude):
        raise DataError("give either text= or domains/exclude, not both")


def _shares(fits: list[int], n: int) -> list[int] | None:
    """Windows per domain for ``n`` samples from domains holding ``fits`` windows: equal shares
    (the first ``n % k`` one more); a domain too short for its share gives all it holds and the
    rest is spread the same way over the others. None when all of them together hold fewer."""
    if n > sum(fits):
        return None
    share, left, open_ = [0] * len(fits), n, list(range(len(fits)))
    while left:
        q, r = divmod(left, len(open_))
        want = {i: q + (1 if j < r else 0) for j, i in enumerate(open_)}
        short = [i for i in open_ if fits[i] - share[i] < want[i]]
        if not short:
            for i in open_:
                share[i] += want[i]
            break
        for i in short:
            left -= fits[i] - share[i]
            share[i] = fits[i]
        open_ = [i for i in open_ if i not in short]
    return share


def _names(v, what: str) -> tuple[str, ...]:
    """A domain name or a sequence of them, as a tuple (a lone string is one name, not letters)."""
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise DataError(f"{what} must be a domain name or a list of them, got {v!r}")
    return tuple(v)


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
    lowbit's default; a name given twice counts once), minus ``exclude``; equal numbers of
    windows from each domain (the first ``nsamples % len(domains)`` one more; a domain too short
    for its share gives every window it holds and the others make up the rest), drawn without
    overlap by a seeded choice, then shuffled together; as ``(batch_size, seqlen)`` int64 token-id
    batches (the last may be smaller) in a :class:`lowbit.evaluate.data.CalibrationBatches` list,
    whose ``provenance`` (domains with their window counts, split, sizes, seed) :func:`lowbit.save`
    records. ``text``: draw from this text instead (your own domain;
    then ``domains`` and ``exclude`` stay unset). Raises :class:`DataError` for unknown or absent
    domains or an unknown ``split``, non-integer sizes or seeds, ``nsamples`` or ``batch_size`` < 1,
    ``seqlen`` < 2, a seed outside [-2**63, 2**64), both ``text`` and domains, or when the domains
    together (or ``text``) hold fewer than ``nsamples`` windows. A ``seqlen`` beyond the model's
    context is refused by :func:`lowbit.quantize`, which sees the model."""
    nsamples, seqlen, batch_size, seed = _ints(nsamples=nsamples, seqlen=seqlen, batch_size=batch_size,
                                               seed=seed).values()  # fmt: skip
    bad = [f"{what} must be >= {lo}, got {v}" for what, v, lo in
           (("nsamples", nsamples, 1), ("seqlen", seqlen, 2), ("batch_size", batch_size, 1)) if v < lo]  # fmt: skip
    if bad:
        raise DataError("; ".join(bad))
    _seed_range(seed)
    _text_or_domains(domains, exclude, text)
    if text is not None:
        return data.calibration_batches(tokenizer, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, seed=seed,
                                        text=text)  # fmt: skip
    names = _resolve(domains, _names(exclude, "exclude"))
    ids = {n: domain_token_ids(tokenizer, n, split) for n in names}
    shares = _shares([len(ids[n]) // seqlen for n in names], nsamples)
    if shares is None:
        have = ", ".join(f"{n} {len(ids[n]) // seqlen}" for n in names)
        hint = ""
        if "python-docs" in names and data.text_source() != "python3.11-doc":
            hint = (f"; python-docs is the stdlib's short pydoc_data text here (apt-get install "
                    f"{DOMAINS['python-docs'][1]} for the full documentation)")  # fmt: skip
        raise DataError(f"{nsamples} windows of {seqlen} tokens do not fit in the {split} split of {', '.join(names)} "
                        f"(windows each holds: {have}){hint}; ask for fewer or shorter samples "
                        "(max_calibration_samples), or add domains")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    parts = []
    for name, want in zip(names, shares):
        if want == 0:
            continue
        parts.append(data.windows(ids[name], want, seqlen, g, f"the {split} split of {name}"))
    allw = torch.cat(parts)[torch.randperm(nsamples, generator=g)]
    prov = {"domains": {n: k for n, k in zip(names, shares) if k}, "split": split, "nsamples": nsamples,
            "seqlen": seqlen, "seed": seed}  # fmt: skip
    return data.CalibrationBatches([allw[i : i + batch_size] for i in range(0, nsamples, batch_size)], prov)
