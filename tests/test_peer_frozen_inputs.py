"""benchmarks/peer_algorithms.py's frozen inputs (--write-data / --data): a peer run on a machine
without the text packages must calibrate on the very windows lowbit's cells use and score the very
tokens domain_perplexities scores, or refuse."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
peers = pytest.importorskip("peer_algorithms")


@pytest.fixture(scope="module")
def frozen(smollm2, tmp_path_factory):
    from lowbit.evaluate.domains import available_domains

    calib = available_domains()[0]
    path = tmp_path_factory.mktemp("frozen") / "data.safetensors"
    peers.write_data(path, smollm2.tokenizer, [calib], [3], n=2, tokens=1024)
    return path, calib


def test_frozen_windows_are_the_cells_windows(smollm2, frozen):
    import lowbit

    path, calib = frozen
    job = {"calib_samples": 2, "calib_domain": calib, "seed": 3, "data": str(path)}
    want = torch.cat(lowbit.calibration_batches(smollm2.tokenizer, calib, nsamples=2, seqlen=512, seed=3))
    assert peers._calib(smollm2.tokenizer, job).equal(want)
    with pytest.raises(RuntimeError, match="the job wants"):
        peers._calib(smollm2.tokenizer, dict(job, calib_samples=3))


def test_frozen_texts_score_as_domain_perplexities(smollm2, frozen):
    from lowbit.evaluate.domains import domain_perplexities

    path, _ = frozen
    got, _ = peers._domain_ppl(smollm2.model, smollm2.tokenizer, 1024, str(path))
    want = domain_perplexities(smollm2.model, smollm2.tokenizer, max_tokens=1024, seqlen=peers.SEQLEN)
    assert got == {d: round(r.ppl, 4) for d, r in want.items()}
    with pytest.raises(RuntimeError, match="1024-token eval texts"):
        peers._domain_ppl(smollm2.model, smollm2.tokenizer, 2048, str(path))


def test_a_tokenizer_that_splits_the_text_otherwise_is_refused(smollm2, frozen):
    path, _ = frozen
    tok = smollm2.tokenizer

    def shifted(text, **kw):  # another tokenizer: every id one higher
        out = tok(text, **kw)
        out["input_ids"] = out["input_ids"] + 1
        return out

    with pytest.raises(RuntimeError, match="splits .* otherwise"):
        peers._domain_ppl(smollm2.model, shifted, 1024, str(path))


def test_lowbit_cells_already_in_the_domains_cache_are_skipped(tmp_path):
    import json

    jobs = [dict(j, calib_domain=c, seed=sd) for j in peers._lowbit_jobs(["w4g64"], 32)
            for c in ("a", "b") for sd in (0, 1)]  # fmt: skip
    assert [j["algo"] for j in jobs[::4]] == ["gptq", "awq", "awq+gptq"]
    cache = tmp_path / "domains_rows.json"
    assert peers._skip_done(jobs, cache, 4096) == jobs  # no cache yet: every cell runs
    cache.write_text(json.dumps({"w4g64/awq/b/1/4096/32x512": {}, "w4g64/awq/b/1/2048/32x512": {}}))
    left = peers._skip_done(jobs, cache, 4096)
    assert len(left) == 11 and not any(j["algo"] == "awq" and j["calib_domain"] == "b" and j["seed"] == 1
                                       for j in left)  # fmt: skip
