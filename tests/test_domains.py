"""Text domains (lowbit.evaluate.domains): disjoint, de-duplicated splits; mixed calibration."""

import pytest
import torch

import lowbit
from lowbit.evaluate import domains as D


def _present(name):
    if D.missing_reason(name):
        pytest.skip(D.missing_reason(name))


@pytest.mark.parametrize("name", list(D.DOMAINS))
def test_splits_share_no_paragraph_and_are_stable(name):
    _present(name)
    parts = {s: D.domain_text(name, s) for s in ("eval", "calib", "train")}
    assert len(parts["eval"]) > 50_000 and len(parts["calib"]) > 50_000
    if name == "python-docs":
        return  # a document-level split (lowbit.evaluate.data)
    paras = {s: {D._normal(p) for p in t.split("\n\n")} for s, t in parts.items()}
    assert not paras["eval"] & paras["calib"] and not paras["eval"] & paras["train"]
    assert not paras["calib"] & paras["train"]
    D.domain_text.cache_clear()
    D._paragraphs.cache_clear()
    assert D.domain_text(name, "eval") == parts["eval"]


def test_near_duplicate_paragraphs_land_in_one_split(tmp_path, monkeypatch):
    (tmp_path / "A").write_text("Same words here, twice over.\n\nUnique text one, long enough.\n")
    (tmp_path / "B").write_text("same  words here,\ttwice over.\n\nUnique text two, long enough.\n")
    monkeypatch.setattr(D, "LICENCES", tmp_path)
    D._paragraphs.cache_clear()
    try:
        paras = D._paragraphs("licences")
    finally:
        D._paragraphs.cache_clear()
    assert [p for _, p in paras] == ["Same words here, twice over.", "Unique text one, long enough.",
                                     "Unique text two, long enough."]  # fmt: skip


def test_unknown_and_absent_domains_fail_clearly(monkeypatch, tmp_path):
    with pytest.raises(D.DataError, match="unknown text domain 'poetry'"):
        D.domain_text("poetry", "eval")
    with pytest.raises(D.DataError, match="unknown split 'test'"):
        D.domain_text("licences", "test")
    monkeypatch.setattr(D, "FORTUNES", tmp_path / "nothing")
    D._paragraphs.cache_clear()
    D.domain_text.cache_clear()
    try:
        with pytest.raises(D.DataError, match="apt-get install fortunes"):
            D.domain_text("quotes", "eval")
        assert "quotes" not in D.available_domains()
    finally:
        D._paragraphs.cache_clear()
        D.domain_text.cache_clear()


def test_mixed_calibration_draws_equally_from_every_domain(smollm2):
    tok = smollm2.tokenizer
    names = D.available_domains()
    assert len(names) >= 2 and names[0] == "python-docs"
    batches = lowbit.calibration_batches(tok, nsamples=4 * len(names), seqlen=64, batch_size=5, seed=3)
    windows = torch.cat(batches)
    assert windows.shape == (4 * len(names), 64) and [b.shape[0] for b in batches][0] == 5
    # every window is a slice of exactly one domain's calibration tokens; four from each
    owners = []
    for w in windows:
        hits = [n for n in names if _contains(D.domain_token_ids(tok, n, "calib"), w)]
        assert len(hits) == 1
        owners.append(hits[0])
    assert all(owners.count(n) == 4 for n in names)
    again = lowbit.calibration_batches(tok, nsamples=4 * len(names), seqlen=64, batch_size=5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = torch.cat(lowbit.calibration_batches(tok, nsamples=4 * len(names), seqlen=64, seed=4))
    assert not torch.equal(other, windows)
    held = torch.cat(lowbit.calibration_batches(tok, "mixed", nsamples=6, seqlen=64, exclude=("python-docs",)))
    assert not any(_contains(D.domain_token_ids(tok, "python-docs", "calib"), w) for w in held)


def test_calibration_asks_for_more_than_a_domain_holds(smollm2):
    _present("licences")
    with pytest.raises(D.DataError, match="the calib split of licences has"):
        lowbit.calibration_batches(smollm2.tokenizer, "licences", nsamples=200, seqlen=512)


@pytest.mark.parametrize("seqlen", [200, 512, 1500])
def test_max_calibration_samples_is_the_most_that_can_be_drawn(smollm2, seqlen):
    tok = smollm2.tokenizer
    for domains in ("mixed", ("quotes", "licences"), "handbook"):
        if any(D.missing_reason(n) for n in D._resolve(domains, ())):
            continue
        n = D.max_calibration_samples(tok, domains, seqlen=seqlen)
        assert n >= 1
        assert sum(len(b) for b in lowbit.calibration_batches(tok, domains, nsamples=n, seqlen=seqlen)) == n
        with pytest.raises(D.DataError, match="need at least"):
            lowbit.calibration_batches(tok, domains, nsamples=n + 1, seqlen=seqlen)
    text = "A short text of your own, repeated. " * 300
    n = D.max_calibration_samples(tok, text=text, seqlen=seqlen // 4)
    lowbit.calibration_batches(tok, nsamples=n, seqlen=seqlen // 4, text=text)
    with pytest.raises(D.DataError):
        lowbit.calibration_batches(tok, nsamples=n + 1, seqlen=seqlen // 4, text=text)


def test_cli_distillation_samples_default_to_what_the_calibration_text_holds(smollm2, tmp_path):
    """``lowbit compress ... --seqlen 512 --distill-blocks 2`` on SmolLM2 (README's example) once
    asked the licences' calibration split for 64 windows of 512 tokens it does not hold."""
    import argparse

    from lowbit.cli import _default_distill_samples, _model_inputs

    args = argparse.Namespace(calib=None, calib_domains=None, seqlen=512)
    n = _default_distill_samples(smollm2, args)
    assert 1 <= n <= 256 and n == min(256, D.max_calibration_samples(smollm2.tokenizer, seqlen=512))
    assert sum(len(b) for b in _model_inputs(smollm2, n, 512, 2, None, "smollm2-135m")) == n
    args.seqlen = 64
    assert _default_distill_samples(smollm2, args) == 256  # short windows: the full default
    f = tmp_path / "mine.txt"
    f.write_text("Text of my own domain, for distillation. " * 200)
    args.calib, args.seqlen = str(f), 128
    n = _default_distill_samples(smollm2, args)
    assert 1 <= n < 256 and sum(len(b) for b in _model_inputs(smollm2, n, 128, 2, str(f), "smollm2-135m")) == n


def _contains(ids: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``w`` occurs in ``ids`` at a multiple of its length (windows are aligned)."""
    n = len(w)
    rows = ids[: len(ids) // n * n].reshape(-1, n)
    return bool((rows == w).all(1).any())


def test_domain_perplexities_scores_each_domain_on_its_own_eval_tokens(smollm2):
    from lowbit.evaluate.perplexity import perplexity

    _present("licences")
    tok, model = smollm2.tokenizer, smollm2.model
    got = D.domain_perplexities(model, tok, ["licences", "python-docs"], max_tokens=256, seqlen=128)
    assert list(got) == ["licences", "python-docs"]
    for name, r in got.items():
        ids = D.domain_token_ids(tok, name, "eval", 256)
        assert r.windows == 2 and r.tokens == 2 * 127 and r.source == name
        # the same windows scored directly from the domain's eval token ids
        with torch.no_grad():
            out = model(ids.reshape(2, 128), labels=ids.reshape(2, 128))
        assert r.nll == pytest.approx(float(out.loss), rel=1e-4)
    assert got["licences"].ppl != got["python-docs"].ppl
    ref = perplexity(model, tok, text=D.domain_text("licences", "eval"), max_tokens=256, seqlen=128)
    assert got["licences"].ppl == pytest.approx(ref.ppl, rel=1e-6)
    with pytest.raises(D.DataError, match="unknown"):
        D.domain_perplexities(model, tok, ["no-such-domain"], max_tokens=256, seqlen=128)
    with pytest.raises(D.DataError, match="fewer than max_tokens"):
        D.domain_perplexities(model, tok, ["licences"], max_tokens=10**8)
