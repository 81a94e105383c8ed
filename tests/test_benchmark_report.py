"""The benchmark report's arithmetic (benchmarks/report.py): figures README copies must be right."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
report = pytest.importorskip("report")


def _res():
    fp = {"a": 10.0, "b": 20.0}
    rows = [{"scheme": "fp32", "method": "fp32", "calib": "-", "seed": 0, "ppl": fp},
            {"scheme": "w4", "method": "rtn", "calib": "-", "seed": 0, "ppl": {"a": 20.0, "b": 40.0}},
            # calibrated on a: its unseen domain is b (RTN loss 20) -> kept 0.5 and 0.25 over two seeds
            {"scheme": "w4", "method": "gptq", "calib": "a", "seed": 0, "ppl": {"a": 11.0, "b": 30.0}},
            {"scheme": "w4", "method": "gptq", "calib": "a", "seed": 1, "ppl": {"a": 11.0, "b": 25.0}},
            # calibrated on b: unseen a (RTN loss 10) -> kept 0.9
            {"scheme": "w4", "method": "gptq", "calib": "b", "seed": 0, "ppl": {"a": 19.0, "b": 21.0}}]
    peers = [{"peer": "llmc", "version": "0.1", "algorithm": "GPTQ (GPTQModifier)", "scheme": "w4", "status": "ok",
              "calib_domain": "a", "seed": 0, "ppl_by_domain": {"a": 12.0, "b": 50.0}},
             {"peer": "llmc", "algorithm": "AWQ (x)", "scheme": "w4", "status": "error", "calib_domain": "a"}]
    return {"evals": ["a", "b"], "rows": rows, "peers": peers}


def test_domains_overview_means_pairs_then_seeds_and_reports_the_worst_run():
    text = report.domains_overview(_res())
    line = next(x for x in text.splitlines() if x.startswith("| w4 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # gptq: pair (a->b) mean over seeds 0.375, pair (b->a) 0.9 -> 0.64; worst run 0.9
    assert cells[1] == "0.64 (worst 0.90; 1-2 seeds)"
    # the peer's one ok row: b kept (50-20)/20 = 1.5, its failed row ignored
    assert cells[2] == "1.50 (worst 1.50; 1 seed)"
    assert "llm-compressor GPTQ" in text and "AWQ" not in text.split("\n\n")[1].splitlines()[0]


def test_data_free_rows_count_every_domain_in_the_overview_but_are_no_claim():
    res = _res()
    # HQQ uses no data: both domains are unseen -> kept (15-10)/10 = 0.5 and (38-20)/20 = 0.9
    res["rows"].append({"scheme": "w4", "method": "hqq", "calib": "-", "seed": 0, "ppl": {"a": 15.0, "b": 38.0}})
    res.update(tokens=1, domains={"a": "A", "b": "B"}, calibration="c", seeds=[0, 1], date="d", command="c",
               machine={"cpu": "x", "threads": 2, "torch": "t"}, versions={})
    line = next(x for x in report.domains_overview(res).splitlines() if x.startswith("| w4 "))
    assert [c.strip() for c in line.strip("|").split("|")][2] == "0.70 (worst 0.90; 1 seed)"
    # the per-scheme claim ("the best method keeps at most ...") is over calibrated methods only:
    # gptq's pairs are a->b 0.375 and b->a 0.9, so the worst best-method pair is 0.90 (gptq), never hqq
    text = report._domains(res)
    claim = next(x for x in text.splitlines() if x.startswith("Unseen domains:"))
    assert "keeps at most 0.90 of RTN's loss (gptq, b → a)" in claim and "hqq" not in claim


def test_peer_rows_name_their_device_and_the_cross_device_rerun():
    res = _res()
    gpu = dict(res["peers"][0], seed=1, env="torch 2.11.0, transformers 5.17.0, 1 threads, NVIDIA H200")
    res["peers"][0]["env"] = "torch 2.13.0+cpu, transformers 5.17.0, 2 threads"
    res["peers"].append(gpu)
    check = [dict(res["peers"][0], env=gpu["env"], ppl_by_domain={"a": 12.5, "b": 48.0})]
    text = report._peer_devices(res["peers"], check)
    assert "CPU: llm-compressor GPTQ (seed 0); NVIDIA H200: llm-compressor GPTQ (seed 1)" in text
    assert "a 12.00 vs 12.50, b 50.00 vs 48.00" in text
    assert report._peer_devices(res["peers"][:1], None) == ""  # one device: nothing to say


def test_cells_from_another_machine_are_named_with_the_same_cell_on_both():
    rows = _res()["rows"]
    rows[3] = dict(rows[3], machine="Xeon; torch 2.11.0, 2 threads")  # gptq a seed 1, imported
    check = {"w4/gptq/a/0/1/2x512": [{"ppl": {"a": 11.5, "b": 29.0}, "machine": "Xeon; torch 2.11.0, 2 threads"}]}
    text = report._cell_machines(rows, check)
    assert "1 on Xeon; torch 2.11.0, 2 threads (seed 1)" in text
    # the check pairs this table's cell (gptq a seed 0: a 11.0, b 30.0) with the other machine's figures
    assert "cell w4/gptq/a/0 vs the same cell rerun on Xeon; torch 2.11.0, 2 threads: a 11.00 vs 11.50, b 30.00 vs 29.00" in text
    assert report._cell_machines(_res()["rows"], check) == ""  # every cell computed here: nothing to say


def test_imported_cells_fill_the_cache_and_never_replace_a_cell_computed_here(tmp_path, monkeypatch):
    run_all = pytest.importorskip("run_all")
    import json

    monkeypatch.setattr(run_all, "DOMAIN_CACHE", tmp_path / "domains_rows.json")
    monkeypatch.setattr(run_all, "DOMAIN_MACHINE_CHECK", tmp_path / "check.json")
    here = {"w4g64/gptq/a/0/4096/32x512": {"scheme": "w4g64", "method": "gptq", "calib": "a", "seed": 0,
                                           "ppl": {"a": 11.0}}}
    run_all.DOMAIN_CACHE.write_text(json.dumps(here))
    row = {"peer": "lowbit", "status": "ok", "algorithm": "lowbit awq+gptq", "scheme": "w4g64", "calib_domain": "a",
           "seed": 2, "tokens": 4096, "calib_samples": 32, "ppl_by_domain": {"a": 10.5}, "quant_seconds": 9.0,
           "cpu": "Xeon", "env": "torch 2.11.0, 2 threads"}
    rows = [row, dict(row, algorithm="lowbit gptq", seed=0, ppl_by_domain={"a": 11.2}),
            dict(row, seed=1, status="error"), dict(row, peer="llmc", seed=3),  # neither is taken
            dict(row, seed=4, calib_seqlen=256)]  # its windows' length is in its key
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert run_all.import_domain_rows(tmp_path / "rows.json") == (2, 1)
    cache = json.loads(run_all.DOMAIN_CACHE.read_text())
    assert cache["w4g64/gptq/a/0/4096/32x512"] == here["w4g64/gptq/a/0/4096/32x512"]  # kept as computed here
    new = cache["w4g64/awq+gptq/a/2/4096/32x512"]
    assert (new["method"], new["seed"], new["ppl"], new["machine"]) == ("awq+gptq", 2, {"a": 10.5},
                                                                         "Xeon; torch 2.11.0, 2 threads")
    check = {"w4g64/gptq/a/0/4096/32x512": [{"ppl": {"a": 11.2}, "machine": "Xeon; torch 2.11.0, 2 threads"}]}
    assert json.loads(run_all.DOMAIN_MACHINE_CHECK.read_text()) == check
    run_all.import_domain_rows(tmp_path / "rows.json")  # again: the same machine's figures replace its own
    assert json.loads(run_all.DOMAIN_MACHINE_CHECK.read_text()) == check
    assert len(cache) == 3 and cache["w4g64/awq+gptq/a/4/4096/32x256"]["seed"] == 4


def test_minilm_unseen_takes_the_lowest_unseen_pair_never_an_in_domain_cell():
    rows = [{"scheme": "w4", "method": "rtn", "calib": "-", "seed": 0, "cos": {"a": 0.95, "b": 0.94}},
            # calibrated on a: its in-domain cell (0.90, lower than every unseen one) is no claim
            {"scheme": "w4", "method": "gptq", "calib": "a", "seed": 0, "cos": {"a": 0.90, "b": 0.985}},
            {"scheme": "w4", "method": "gptq", "calib": "a", "seed": 1, "cos": {"a": 0.90, "b": 0.981}},
            {"scheme": "w4", "method": "gptq", "calib": "b", "seed": 0, "cos": {"a": 0.984, "b": 0.90}},
            {"scheme": "w4", "method": "gptq", "calib": "b", "seed": 1, "cos": {"a": 0.982, "b": 0.90}}]
    text = report.minilm_unseen({"rows": rows})
    # pair means: a -> b 0.983, b -> a 0.983 (ties keep the first); worst run 0.981
    assert "w4 gptq: mean cosine at least 0.9830" in text and "worst single run 0.9810" in text
    assert "2 seed(s) per pair; RTN 0.9400-0.9500" in text


def test_a_domains_cell_claimed_by_a_live_run_is_left_to_it_and_a_dead_runs_claim_is_taken_over(tmp_path, monkeypatch):
    run_all = pytest.importorskip("run_all")
    import json
    import subprocess

    monkeypatch.setattr(run_all, "DOMAIN_CLAIMS", tmp_path / "claims.json")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        run_all.DOMAIN_CLAIMS.write_text(json.dumps({"k1": live.pid, "k2": dead.pid}))
        assert not run_all._claim_cell("k1")  # a run beside this one computes it
        assert run_all._claim_cell("k2") and run_all._claim_cell("k3")
        assert run_all._claim_cell("k3")  # its own claim again
        run_all._release_cell("k3")
        run_all._release_cell("k1")  # not ours: stays
        assert json.loads(run_all.DOMAIN_CLAIMS.read_text()) == {"k1": live.pid, "k2": os.getpid()}
    finally:
        live.kill()
        live.wait()
