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
    with pytest.raises(
        D.DataError,
        match=r"200 windows of 512 tokens do not fit in the calib split of licences \(windows each holds: licences \d+\)",
    ):
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
        with pytest.raises(D.DataError, match="do not fit"):
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


@pytest.mark.parametrize(
    "fits, n, want",
    [
        ([10, 10, 10], 7, [3, 2, 2]),  # equal shares, the first n % k one more
        ([1, 10, 10], 7, [1, 3, 3]),  # a short domain gives all it has, the others share the rest
        ([1, 2, 10], 9, [1, 2, 6]),
        ([0, 5], 3, [0, 3]),
        ([3, 4], 7, [3, 4]),  # every window
        ([3, 4], 8, None),  # more than all of them hold
    ],
)
def test_calibration_shares_fill_short_domains_from_the_others(fits, n, want):
    got = D._shares(fits, n)
    assert got == want
    if got is not None:
        assert sum(got) == n and all(0 <= g <= f for g, f in zip(got, fits))


def test_mixed_calibration_survives_a_short_domain(smollm2, monkeypatch):
    """Without Debian's python3.11-doc, python-docs is the stdlib's short pydoc_data text (about
    14 windows of 512): lowbit's default 64 x 512 mixed calibration must still draw, from the other
    domains, and an impossible request must say what to install."""
    tok = smollm2.tokenizer
    names = D.available_domains()
    if len(names) < 3:
        pytest.skip("needs three text domains")
    short = names[1]
    real = D.domain_token_ids
    monkeypatch.setattr(
        D,
        "domain_token_ids",
        lambda t, n, split="eval", max_tokens=None: (
            real(t, n, split, max_tokens)[: 3 * 64] if n == short else real(t, n, split, max_tokens)
        ),
    )
    windows = torch.cat(lowbit.calibration_batches(tok, nsamples=8 * len(names), seqlen=64, seed=1))
    assert len(windows) == 8 * len(names) and len({tuple(w.tolist()) for w in windows}) == len(windows)
    from_short = sum(_contains(real(tok, short, "calib")[: 3 * 64], w) for w in windows)
    assert from_short == 3  # all it holds; the others made up the rest
    assert D.max_calibration_samples(tok, seqlen=64) == sum(
        len(D.domain_token_ids(tok, n, "calib")) // 64 for n in names
    )


def test_calibration_arguments_are_checked(smollm2):
    tok = smollm2.tokenizer
    for kw, msg in [({"nsamples": 2.0}, "nsamples must be an integer"), ({"nsamples": True}, "nsamples must be an integer"),
                    ({"seqlen": 2.5}, "seqlen must be an integer"), ({"seed": None}, "seed must be an integer"),
                    ({"seed": "0"}, "seed must be an integer"), ({"seed": 2**70}, "seed must be in"),
                    ({"text": "some text " * 50, "domains": "quotes"}, "either text= or domains"),
                    ({"domains": None}, "domains must be a domain name or a list"),
                    ({"domains": ["mixed", "quotes"]}, "does not combine"),
                    ({"domains": "word " * 30}, "pass it as text=")]:  # fmt: skip
        with pytest.raises(D.DataError, match=msg):
            lowbit.calibration_batches(tok, **{"nsamples": 2, "seqlen": 16, **kw})
    # a lone string to exclude is one name; a name given twice is one domain
    names = D.available_domains()
    held = torch.cat(lowbit.calibration_batches(tok, nsamples=6, seqlen=32, exclude=names[0]))
    assert not any(_contains(D.domain_token_ids(tok, names[0], "calib"), w) for w in held)
    n = D.max_calibration_samples(tok, [names[1], names[1]], seqlen=512)
    assert n == D.max_calibration_samples(tok, names[1], seqlen=512)
    w = torch.cat(lowbit.calibration_batches(tok, [names[1], names[1]], nsamples=n, seqlen=512))
    assert len({tuple(r.tolist()) for r in w}) == n  # every window once
    import numpy as np

    assert len(torch.cat(lowbit.calibration_batches(tok, nsamples=np.int64(2), seqlen=16, seed=np.int64(3)))) == 2
    assert lowbit.calibration_batches(tok, nsamples=1, seqlen=16, seed=2**64 - 1)  # torch's whole seed range
    assert lowbit.calibration_batches(tok, ("mixed",), nsamples=1, seqlen=16, text="own words " * 50)
    for kw in ({"seqlen": 64.5}, {"seqlen": "64"}, {"domains": "quotes", "text": "own words " * 50}):
        with pytest.raises(D.DataError, match="must be an integer|either text= or domains"):
            D.max_calibration_samples(tok, **kw)
    with pytest.raises(D.DataError, match="stands for every domain"):
        D.domain_text("mixed", "eval")
    for kw in ({"seqlen": 1}, {"max_tokens": 100, "seqlen": 128}, {"max_tokens": 0}):
        with pytest.raises(D.DataError, match="seqlen <= max_tokens|must be"):
            D.domain_perplexities(smollm2.model, tok, names[:1], **kw)
    with pytest.raises(D.DataError, match="longer than the model's context of 8192"):
        D.domain_perplexities(smollm2.model, tok, names[:1], max_tokens=9000, seqlen=9000)
    from lowbit.models.zoo import load_model

    minilm = load_model("minilm")
    with pytest.raises(D.DataError, match="needs a causal language model"):
        D.domain_perplexities(minilm.model, minilm.tokenizer, "quotes", max_tokens=256, seqlen=128)
    with pytest.raises(D.DataError, match="no text domain left to score"):
        D.domain_perplexities(smollm2.model, tok, [])
    with pytest.raises(D.DataError, match="max_tokens must be a positive integer"):
        D.domain_token_ids(tok, names[0], "eval", max_tokens=0)
    assert len(D.domain_token_ids(tok, names[0], "eval", max_tokens=np.int64(5))) == 5
    with pytest.raises(D.DataError, match="nsamples must be >= 1, got 0"):
        lowbit.calibration_batches(tok, nsamples=0, seqlen=16)
    quotes = D.domain_sentences("quotes", n=4, seed=np.int64(3))
    assert len(quotes) == 4 and quotes == D.domain_sentences("quotes", n=4, seed=3)
    for kw, msg in (({"n": -3}, "n must be >= 0"), ({"n": 2.5}, "n must be an integer"),
                    ({"n": 2, "seed": 1.5}, "seed must be an integer"), ({"n": 2, "seed": 2**64}, "seed must be in")):  # fmt: skip
        with pytest.raises(D.DataError, match=msg):
            D.domain_sentences("quotes", **kw)


def test_cli_calibration_text_options(smollm2, tmp_path):
    from lowbit.cli import CliError, _domain_names, _model_inputs

    f = tmp_path / "mine.txt"
    f.write_text("Text of my own domain. " * 200)
    with pytest.raises(CliError, match="give one"):
        _model_inputs(smollm2, 2, 16, 0, str(f), "smollm2-135m", "quotes")
    with pytest.raises(CliError, match="--calib needs a file name"):
        _model_inputs(smollm2, 2, 16, 0, "", "smollm2-135m")
    assert _domain_names(" handbook , quotes,") == ("handbook", "quotes")
    assert _domain_names(None) == ("mixed",)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 100)
    with pytest.raises(CliError, match=r"latin1.txt: not UTF-8 text"):
        _model_inputs(smollm2, 2, 16, 0, str(bad), "smollm2-135m")
    with pytest.raises(CliError, match=r"nothing.txt: No such file"):
        _model_inputs(smollm2, 2, 16, 0, str(tmp_path / "nothing.txt"), "smollm2-135m")
    # valid UTF-8 that is no text: NULs (binary, UTF-16 without a mark), or mostly control characters
    (tmp_path / "u16.txt").write_bytes("Some prose of mine. ".encode("utf-16-le") * 100)
    (tmp_path / "ctl.txt").write_bytes(bytes(range(1, 9)) * 50 + b"words " * 100)
    for name, msg in (("u16.txt", "holds NUL characters"), ("ctl.txt", "400 of its 1000 characters are control characters")):
        with pytest.raises(CliError, match=rf"--calib .*{name}: {msg}"):
            _model_inputs(smollm2, 2, 16, 0, str(tmp_path / name), "smollm2-135m")
    # an option given with no name in it is an error, never the default; a text too short names its file
    for given in ("", " , "):
        with pytest.raises(CliError, match="--calib-domains: no domain names given"):
            _model_inputs(smollm2, 2, 16, 0, None, "smollm2-135m", given)
        with pytest.raises(CliError, match="give one"):
            _model_inputs(smollm2, 2, 16, 0, str(f), "smollm2-135m", given)
    with pytest.raises(CliError, match=r"--calib .*mine.txt: the calibration text has 1201 tokens"):
        _model_inputs(smollm2, 500, 64, 0, str(f), "smollm2-135m")


def test_token_ids_are_kept_per_tokenizer_not_per_name():
    """Two tokenizers of one name and vocabulary that split text differently (an option) each get
    their own ids (the cache once keyed on the name and returned the first one's)."""
    transformers = pytest.importorskip("transformers")
    from lowbit.models.zoo import load_model

    t1 = load_model("minilm").tokenizer
    t2 = transformers.AutoTokenizer.from_pretrained(t1.name_or_path, do_lower_case=False)
    assert t1.name_or_path == t2.name_or_path and len(t1) == len(t2)
    a, b = D.domain_token_ids(t1, "quotes", max_tokens=2000), D.domain_token_ids(t2, "quotes", max_tokens=2000)
    assert not torch.equal(a, b)
    assert torch.equal(b, t2(D.domain_text("quotes", "eval")[:16000], add_special_tokens=False,
                             return_tensors="pt")["input_ids"][0][:2000])  # fmt: skip
    assert D.domain_token_ids(t1, "quotes", max_tokens=2000) is a  # still tokenized once per tokenizer


def test_a_saved_model_says_what_it_was_calibrated_on(smollm2, tmp_path, capsys):
    """calibration_batches' provenance travels through quantize and save into the manifest, back
    through load and into ``lowbit inspect``; a caller's own iterable is named by its kind only, and
    a data-free method records none."""
    transformers = pytest.importorskip("transformers")
    from lowbit.cli import main
    from lowbit.io import read_manifest

    names = D.available_domains()[:2]
    tok = smollm2.tokenizer
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cal = lowbit.calibration_batches(tok, names, nsamples=3, seqlen=32, batch_size=2, seed=7)
    assert [b.shape[0] for b in cal] == [2, 1]
    lowbit.quantize(model, "w4g32", method="gptq", calibration=cal)
    want = {"domains": {names[0]: 2, names[1]: 1}, "split": "calib", "nsamples": 3, "seqlen": 32, "seed": 7}
    assert model.lowbit_calibration == want
    lowbit.save(model, tmp_path / "q", tokenizer=tok)
    assert read_manifest(tmp_path / "q")["calibration"] == want
    assert lowbit.load(tmp_path / "q").lowbit_calibration == want
    assert main(["inspect", str(tmp_path / "q")]) == 0
    assert f"calibrated on: domains {want['domains']}, split calib, nsamples 3, seqlen 32, seed 7" in capsys.readouterr().out

    text = D.domain_text(names[0], "calib")[:20_000]
    own = lowbit.calibration_batches(tok, text=text, nsamples=2, seqlen=32)
    assert own.provenance["text_characters"] == 20_000 and len(own.provenance["text_sha256"]) == 64
    other = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(other, "w4g32", method="gptq", calibration=iter(list(own)))
    assert other.lowbit_calibration == {"source": "caller's list_iterator"}
    free = lowbit.quantize(transformers.LlamaForCausalLM(cfg).eval(), "w4g32", method="rtn")
    lowbit.save(free, tmp_path / "free")
    assert "calibration" not in read_manifest(tmp_path / "free") and not hasattr(free, "lowbit_calibration")
