"""The `lowbit` command end to end, in a subprocess, on the digits CNN of the zoo."""

import json
import os
import subprocess
import sys

import pytest


def run(*args, ok=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("cli") / "digits-w4"
    p = run("quantize", "digits-cnn", "--scheme", "w4g16-asym", "-o", str(out), "-q")
    assert "quantized digits-cnn with w4g16-asym" in p.stdout
    return out


def test_quantize_then_inspect_lists_every_layer(quantized):
    p = run("inspect", str(quantized), "--error")
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        assert layer in p.stdout
    assert "w4g16-asym" in p.stdout and "rel.err" in p.stdout
    assert "reference" in p.stdout  # g16 has no VNNI path; inspect says which kernel runs and why
    assert "format_version 2" in p.stdout
    assert "CPU kernels: " in p.stdout  # which instruction set the CPU kernels run, and why


def test_eval_compares_with_the_fp32_original(quantized):
    p = run("eval", str(quantized), "--json")
    rows = json.loads(p.stdout)
    assert [r["variant"] for r in rows] == ["digits-cnn fp32", str(quantized)]
    assert rows[0]["accuracy"] > 0.95
    assert abs(rows[1]["accuracy"] - rows[0]["accuracy"]) < 0.05
    assert rows[1]["bytes"] < rows[0]["bytes"] / 3
    table = run("eval", str(quantized)).stdout
    assert "accuracy" in table and "Δpts" in table


def test_estimate_and_formats():
    p = run("estimate", "--params", "70e9", "--scheme", "w4g128")
    assert "280.00" in p.stdout and "140.00" in p.stdout and "36.09" in p.stdout
    p = run("formats")
    assert "nf4" in p.stdout and "w4g64-asym" in p.stdout and "scheme :=" in p.stdout


def test_bench_quick_runs_and_reports_ratios():
    p = run("bench", "--quick", "--reps", "3", "-q", "--schemes", "int8", "w4g64")
    assert "torch fp32" in p.stdout and "lowbit w4g64" in p.stdout and "speed vs fp32" in p.stdout
    assert "read bandwidth (torch sum)" in p.stdout and "GB/s read" in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("quantize", "digits-cnn", "--scheme", "w4g65", "-o", "x"), "scheme :="),
        (("quantize", "no-such-model", "--scheme", "int8", "-o", "x"), "not a zoo model"),
        (("inspect", "/nonexistent"), "not a directory"),
        (("quantize", "digits-cnn", "-o", "x"), "exactly one of --scheme or --recipe"),
        (("estimate",), "give --params"),
        (("quantize", "smollm2-135m", "--scheme", "w4g64", "--method", "gptq", "--calib-domains", "poetry", "-o", "x"),
         "unknown text domain 'poetry'"),
        (("quantize", "digits-cnn", "--scheme", "w4g16", "--calib-domains", "quotes", "-o", "x"),
         "--method rtn uses no calibration data"),
        (("quantize", "digits-cnn", "--scheme", "w4g16", "--method", "hqq", "--calib", "t.txt", "-o", "x"),
         "--calib given, but --method hqq uses no calibration data"),
    ],
)
def test_bad_input_one_clear_error(args, message, tmp_path):
    p = run(*args, ok=False)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_recipe_file(tmp_path, digits):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"format": "lowbit-recipe", "version": 1, "default": "int8",
                                  "rules": [{"pattern": "fc2", "scheme": "skip"}]}))  # fmt: skip
    out = tmp_path / "m"
    run("quantize", "digits-cnn", "--recipe", str(recipe), "-o", str(out), "-q")
    p = run("inspect", str(out))
    line = next(x for x in p.stdout.splitlines() if x.startswith("fc2 "))
    assert "kept" in line and "rule 'fc2'" in line
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "lowbit-recipe", "version": 7}')
    p = run("quantize", "digits-cnn", "--recipe", str(bad), "-o", str(out), ok=False)
    assert p.returncode == 2 and "unknown recipe version" in p.stderr


def test_sensitivity_allocates_a_recipe_that_quantizes(tmp_path, digits):
    table, recipe, plot = tmp_path / "s.json", tmp_path / "r.json", tmp_path / "s.png"
    p = run("sensitivity", "digits-cnn", "--candidates", "w2g16,w4g16,int8", "--target-bpw", "3.5",
            "-o", str(table), "--recipe-out", str(recipe), "--plot", str(plot), "-q")  # fmt: skip
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        assert layer in p.stdout
    assert "allocation:" in p.stdout and "optimality gap 0 nats" in p.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bpw = float(p.stdout.split("allocation:")[1].split("bits/weight")[0].split(";")[-1])
    assert 3.0 < bpw <= 3.5
    out = tmp_path / "m"
    run("quantize", "digits-cnn", "--recipe", str(recipe), "-o", str(out), "-q")
    inspect = run("inspect", str(out)).stdout
    assert "w2g16" in inspect or "w4g16" in inspect
    # a stored table is re-allocated without measuring; an unreachable budget names the reachable end
    p = run("sensitivity", "digits-cnn", "--table", str(table), "--target-bpw", "2", ok=False)
    assert p.returncode == 2 and "smallest reachable" in p.stderr and "Traceback" not in p.stderr
    p = run("sensitivity", "digits-cnn", "--table", str(table), "--max-loss", "1e-12", ok=False)
    assert p.returncode == 2 and "least reachable" in p.stderr
    # predicted from Hessian traces instead of measured: the same table and recipe outputs
    fast = tmp_path / "h.json"
    p = run("sensitivity", "digits-cnn", "--candidates", "w2g16,w4g16,int8", "--cost", "hessian",
            "--target-bpw", "3.5", "-o", str(fast), "-q")  # fmt: skip
    assert "allocation:" in p.stdout and json.loads(fast.read_text())["info"]["cost"] == "hessian"
    p = run("sensitivity", "digits-cnn", "--cost", "hessian", "--base", "int8", ok=False)
    assert p.returncode == 2 and "measure base= with 'kl'" in p.stderr and "Traceback" not in p.stderr


def test_image_models_calibrate_on_photo_crops(tmp_path):
    out = tmp_path / "mb"
    p = run("quantize", "mobilenet-v2", "--scheme", "w8a8-static", "--observer", "percentile",
            "--nsamples", "16", "-o", str(out), "-q")  # fmt: skip
    assert "quantized mobilenet-v2 with w8a8-static" in p.stdout
    inspect = run("inspect", str(out)).stdout
    assert inspect.count("w8a8-static") == 53 and sum(" folded " in line for line in inspect.splitlines()) == 52


def test_eval_report_compares_variants_with_a_pareto_plot(tmp_path, quantized):
    int8 = tmp_path / "int8"
    run("quantize", "digits-cnn", "--scheme", "int8", "-o", str(int8), "-q")
    report = tmp_path / "report.md"
    p = run("eval", str(quantized), str(int8), "--report", str(report), "-q")
    text = report.read_text()
    assert "digits-cnn fp32" in text and str(int8) in text and str(quantized) in text
    assert "Pareto" in text and "![size vs quality](report.png)" in text
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in text.splitlines() if line.startswith("| ") and "yes" in line]
    assert lines  # at least the smallest model is on the front
    assert "report ->" in p.stdout


def test_image_models_evaluate_by_agreement(tmp_path):
    out = tmp_path / "mb8"
    run("quantize", "mobilenet-v2", "--scheme", "int8", "-o", str(out), "-q")
    rows = json.loads(run("eval", str(out), "--images", "16", "--json", "-q").stdout)
    assert [r["variant"] for r in rows] == ["mobilenet-v2 fp32", str(out)]
    assert rows[0]["agreement"] == 1.0 and rows[0]["kl"] == 0.0  # FP32 against itself
    assert 0.5 <= rows[1]["agreement"] <= 1.0 and rows[1]["kl"] > 0 and rows[1]["img_s"] > 0


def test_quantizing_a_quantized_directory_is_refused(quantized, tmp_path):
    p = run("quantize", str(quantized), "--scheme", "int8", "-o", str(tmp_path / "again"), ok=False)
    assert p.returncode == 2 and "already quantized" in p.stderr and "w4g16-asym" in p.stderr
    assert not (tmp_path / "again").exists()


def test_inspect_says_when_scales_are_stored_as_float32(tmp_path, digits):
    import copy

    import torch

    import lowbit

    model = copy.deepcopy(digits[0].model)
    with torch.no_grad():
        model.fc2.weight.mul_(1e-7)  # float16 scales would underflow
    lowbit.save(lowbit.quantize(model, "w4g16"), tmp_path / "tiny", source="digits-cnn")
    p = run("inspect", str(tmp_path / "tiny"))
    line = next(x for x in p.stdout.splitlines() if x.startswith("fc2 "))
    assert "float32 scales" in line
    assert "float32 scales" not in next(x for x in p.stdout.splitlines() if x.startswith("fc1 "))


def test_generate_streams_a_decode_and_refuses_bad_requests(tmp_path):
    p = run("generate", "smollm2-135m", "--prompt", "The capital of France is", "--max-new-tokens", "12", "--ignore-eos")
    assert len(p.stdout.strip()) > 0 and "12 new" in p.stderr and "tokens/s" in p.stderr
    bad = run("generate", "smollm2-135m", "--prompt", "", ok=False)
    assert bad.returncode == 2 and "empty prompt" in bad.stderr
    long = run("generate", "smollm2-135m", "--prompt", "x", "--max-new-tokens", "9000", ok=False)
    assert long.returncode == 2 and "exceed the model's context of 8192" in long.stderr
    nodec = run("generate", "digits-cnn", "--prompt", "hi", ok=False)
    assert nodec.returncode == 2 and "lowbit: error:" in nodec.stderr


def test_eval_scores_the_text_domains_and_your_own_text(tmp_path, smollm2):
    """`lowbit eval --domains/--text`: one perplexity column per domain or file, the numbers
    lowbit.evaluate.domains computes; bad names, empty files and models without text refused
    before any model is read."""
    from lowbit.evaluate import domains as D

    own = tmp_path / "notes.txt"
    own.write_text(D.domain_text("handbook", "eval")[:8000], encoding="utf-8")
    p = run("eval", "smollm2-135m", "--domains", "quotes", "--text", str(own), "--max-tokens", "512",
            "--seqlen", "256", "--no-speed", "--json", "-q")  # fmt: skip
    row = json.loads(p.stdout)[-1]
    want = D.domain_perplexities(smollm2.model, smollm2.tokenizer, "quotes", max_tokens=512, seqlen=256)["quotes"].ppl
    assert list(row["texts"]) == ["ppl quotes", "ppl notes.txt"]
    assert row["texts"]["ppl quotes"] == pytest.approx(want, rel=1e-5)
    assert 1 < row["texts"]["ppl notes.txt"] < 1000
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "nul.txt").write_bytes(b"\0" * 1000)
    for args, msg in ((("--domains", "poetry"), "unknown text domain 'poetry'"),
                      (("--domains", ""), "--domains: no domain names given"),
                      (("--domains", "all,quotes"), "'all' stands alone"),
                      (("--text", str(tmp_path / "nul.txt")), "--text " + str(tmp_path / "nul.txt") + ": holds NUL"),
                      (("--text", str(tmp_path / "none.txt")), "--text " + str(tmp_path / "none.txt") + ": No such"),
                      (("--text", ""), "--text needs a file name"),
                      (("--text", str(tmp_path / "empty.txt")), "holds no text")):  # fmt: skip
        p = run("eval", "no-such-model", *args, ok=False)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
