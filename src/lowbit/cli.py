"""The ``lowbit`` command. Its choices (schemes, methods, kernels, zoo) come from lowbit's tables.

    lowbit quantize smollm2-135m --scheme w4g64 -o out/
    lowbit eval out/                      # perplexity / accuracy vs the FP32 original, size, speed
    lowbit inspect out/                   # per-layer table: scheme, method, kernel, bytes, bpw
    lowbit estimate --params 70e9 --scheme w4g128
    lowbit sensitivity smollm2-135m --candidates w3g64,w4g64,int8 --target-bpw 4.25 --recipe-out r.json
    lowbit bench                          # kernel speed vs FP32/BF16
    lowbit generate out/ --prompt "..."   # stream a batch-1 decode (Llama-family models)
    lowbit export out/ --to gguf -o m.gguf   # llama.cpp's format (exact Q4_0 / Q8_0 where it maps)
    lowbit formats                        # the format table and scheme presets
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _size(nbytes: int) -> str:
    """Bytes for a summary line: MB with one decimal, kB below 0.1 MB (a 59 kB model is not "0.0 MB")."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def _err(msg: str) -> int:
    print(f"lowbit: error: {msg}", file=sys.stderr)
    return 2


def _threads(args) -> None:
    import torch

    n = getattr(args, "threads", None)
    if n is not None:
        if n < 1:
            raise CliError(f"--threads takes a positive number of threads, got {n}")
        torch.set_num_threads(n)


# ---- quantize ---------------------------------------------------------------------------------
def _calibration(args, zm) -> list:
    """Calibration batches for a calibrated method or static scheme: windows of the calibration
    splits of the built-in text domains (--calib-domains; default mixed) or of --calib FILE for
    language models; training images for digits-cnn;
    calibration-split crops of the bundled photos for ImageNet models."""
    return _model_inputs(zm, args.nsamples, args.seqlen, args.seed, args.calib, args.model,
                         getattr(args, "calib_domains", None))


def _has_static(spec) -> bool:
    """Whether a scheme or recipe quantizes some layer's activations statically (so needs
    calibration inputs whatever the method)."""
    import lowbit

    recipe = lowbit.Recipe.coerce(spec)
    return any(s is not None and s.act_static for s in [recipe.default, *(r.scheme for r in recipe.rules)])


def _model_inputs(zm, n: int, seqlen: int, seed: int, calib_file: str | None, name: str,
                  domains: str | None = None) -> list:
    """``n`` samples of the model's kind of input drawn (seeded) from calibration data, never
    from the data ``lowbit eval`` measures on."""
    import torch

    if zm.task in ("classifier", "image-classifier") and (calib_file or domains):
        raise CliError(f"{name} calibrates on images: --calib and --calib-domains choose text, for language models")
    if zm.task == "classifier":
        from lowbit.models.zoo import digits_data

        x = digits_data()["x_train"]
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return [x[pick[i : i + 64]] for i in range(0, len(pick), 64)]
    if zm.task == "image-classifier":
        from lowbit.evaluate.images import photo_crops

        x = photo_crops(n, split="calib", seed=seed)
        return [x[i : i + 16] for i in range(0, n, 16)]
    if zm.tokenizer is None:
        raise CliError(f"{name} has no tokenizer to turn calibration text into inputs")
    from lowbit.evaluate.domains import calibration_batches

    if calib_file is not None and domains is not None:
        raise CliError("--calib FILE and --calib-domains both choose the calibration text; give one")
    if calib_file is not None:
        from lowbit.evaluate.data import DataError

        text = _calib_text(calib_file)
        try:
            return calibration_batches(zm.tokenizer, nsamples=n, seqlen=seqlen, seed=seed, text=text)
        except DataError as e:
            raise CliError(f"--calib {calib_file}: {e}") from None
    return calibration_batches(zm.tokenizer, _domain_names(domains), nsamples=n, seqlen=seqlen, seed=seed)


def _calib_text(path: str, option: str = "--calib") -> str:
    """The text of ``option`` FILE (--calib, or lowbit eval's --text): UTF-8 text, or a CliError
    naming the option and the file: no file name, unreadable, not UTF-8, or binary (a NUL, as
    UTF-16 text has, or more than 1% control characters other than tab, newlines and form feed)."""
    if not path:
        raise CliError(f"{option} needs a file name")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{option} {path}: not UTF-8 text (byte {e.start}); convert it, e.g. with iconv") from None
    except OSError as e:
        raise CliError(f"{option} {path}: {e.strerror or e}") from None
    if "\x00" in text:
        raise CliError(f"{option} {path}: holds NUL characters, so it is binary or UTF-16, not UTF-8 text; "
                       "convert it, e.g. with iconv -f UTF-16")  # fmt: skip
    control = len(re.findall(r"[\x01-\x08\x0e-\x1f\x7f-\x9f]", text))
    if control > 0.01 * len(text):
        raise CliError(f"{option} {path}: {control} of its {len(text)} characters are control characters: "
                       "binary, not text")  # fmt: skip
    return text


def _domain_names(domains: str | None, option: str = "--calib-domains") -> tuple[str, ...]:
    """``option`` (--calib-domains, or lowbit eval's --domains) as the names calibration_batches
    takes: None (not given) is the default, mixed; spaces around the commas are ignored. Raises
    CliError when the option was given but names no domain (``""``, ``","``)."""
    if domains is None:
        return ("mixed",)
    names = tuple(d.strip() for d in domains.split(",") if d.strip())
    if not names:
        raise CliError(f"{option}: no domain names given ({domains!r})")
    return names


class CliError(ValueError):
    """A command-line usage problem."""


def _device_option(value: str | None):
    """``--device`` as a ``torch.device`` (``None`` when not given), checked before any model is
    read (:func:`lowbit.kernels.check_device`)."""
    if not value:
        return None
    from lowbit.kernels import check_device

    try:
        return check_device(value)
    except ValueError as e:
        raise CliError(f"--device: {e}") from None


def cmd_quantize(args) -> int:
    import lowbit
    from lowbit.algorithms import get_algorithm
    from lowbit.models.source import load_source

    _threads(args)
    if (args.scheme is None) == (args.recipe is None):
        return _err("give exactly one of --scheme or --recipe")
    spec = lowbit.Recipe.load(args.recipe) if args.recipe else lowbit.parse_scheme(args.scheme)
    options = {k: v for k, v in (("clip", args.clip), ("damp", args.damp), ("act_order", args.act_order),
                                 ("shrink", args.shrink),
                                 ("alpha", args.alpha), ("importance", args.importance),
                                 ("sparsity", args.sparsity), ("nm", args.nm)) if v is not None}  # fmt: skip
    if get_algorithm(args.method).prunes and "sparsity" not in options and "nm" not in options:
        return _err(f"--method {args.method} prunes: give --sparsity FRACTION or --nm N:M")
    t0 = time.perf_counter()
    static = _has_static(spec)
    if not (get_algorithm(args.method).uses_calibration or static):
        given = [f for f, v in (("--calib", args.calib), ("--calib-domains", args.calib_domains)) if v is not None]
        if given:
            return _err(f"{' and '.join(given)} given, but --method {args.method} uses no calibration data and "
                        f"{spec} has no static activations: choose a calibrated method (--method gptq, awq, "
                        "awq+gptq) or drop the calibration options")  # fmt: skip
    if args.ray is not None:
        args.stream = True
    if args.stream is None:  # a transformers checkpoint directory streams, whatever the method
        args.stream = _is_checkpoint_dir(args.model)
    if args.stream and args.correction_rank is not None:
        return _err("--correction-rank is not available when streaming (--stream, --ray): load the model instead")
    if args.stream:
        return _quantize_streaming(args, spec, options, get_algorithm(args.method).uses_calibration or static)
    zm = load_source(args.model)
    calibration = _calibration(args, zm) if get_algorithm(args.method).uses_calibration or static else None
    t1 = time.perf_counter()
    model = lowbit.quantize(zm.model, spec, method=args.method, kernel=args.kernel, progress=not args.quiet,
                            calibration=calibration, observer=args.observer, bias_correction=args.bias_correction,
                            correction_rank=args.correction_rank, **options)  # fmt: skip
    t2 = time.perf_counter()
    out = lowbit.save(model, args.output, tokenizer=zm.tokenizer, source=getattr(zm.model, "lowbit_source", None) or args.model,
                      max_shard_bytes=args.shard_size)  # fmt: skip
    size = lowbit.size_of(model)
    print(
        f"quantized {args.model} with {spec} ({args.method}) in {t2 - t1:.1f}s (load {t1 - t0:.1f}s): "
        f"{size.quantized_bits_per_weight:.3f} bits/weight over {len(size.quantized)} layers, "
        f"{size.quantized_compression:.2f}x smaller than FP32; model {_size(size.total_bytes)} -> {out}"
    )
    return 0


def _is_checkpoint_dir(spec: str) -> bool:
    from pathlib import Path

    p = Path(spec)
    return (p / "config.json").is_file() and not (p / "lowbit.json").exists() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


def _quantize_streaming(args, spec, options, calibrated: bool) -> int:
    from lowbit.checkpoint import Checkpoint, quantize_checkpoint
    from lowbit.io import read_manifest

    if not _is_checkpoint_dir(args.model):
        return _err(f"--stream reads a transformers checkpoint directory (config.json + safetensors); {args.model} is not one")
    t0 = time.perf_counter()
    extra = {}
    if calibrated:
        from lowbit.checkpoint import tokenizer_of
        from lowbit.models.zoo import ZooModel

        tok = tokenizer_of(Path(args.model))
        extra = {"calibration": _calibration(args, ZooModel(Path(args.model).name, None, tok, "causal-lm", args.model)),
                 "observer": args.observer, "bias_correction": args.bias_correction}  # fmt: skip
    out = quantize_checkpoint(args.model, spec, args.output, method=args.method, max_shard_bytes=args.shard_size,
                              progress=not args.quiet, ray_address=args.ray, ray_workers=args.ray_workers,
                              **extra, **options)  # fmt: skip
    secs = time.perf_counter() - t0
    m = read_manifest(out)
    src_bytes = Checkpoint(args.model).nbytes
    out_bytes = sum(s["bytes"] for s in m["shards"])
    print(
        f"quantized {args.model} with {spec} ({args.method}, streamed layer by layer"
        f"{', on Ray' if args.ray else ''}) in {secs:.1f}s: "
        f"{len(m['modules'])} layers quantized; {_size(src_bytes)} of checkpoint -> {_size(out_bytes)} "
        f"in {len(m['shards'])} shard(s) ({src_bytes / max(out_bytes, 1):.2f}x smaller) -> {out}"
    )
    return 0


def _bytes(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '4096' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1GiB)")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a shard size must be positive: {text!r}")
    return value


# ---- eval ---------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from lowbit.evaluate.compare import measure
    from lowbit.evaluate.table import text_table
    from lowbit.models.source import load_source
    from lowbit.models.zoo import ZOO, load_model

    _threads(args)
    scored = _eval_texts(args)  # checked before any model is read
    variants = [load_source(m) for m in args.model]
    first = variants[0]
    base_name = args.baseline or _default_baseline(first.source)
    rows = []
    opts = dict(max_tokens=args.max_tokens, seqlen=args.seqlen, speed=not args.no_speed, progress=not args.quiet,
                images=args.images)  # fmt: skip
    base = None
    if base_name and base_name not in args.model:
        base = load_model(base_name) if base_name in ZOO else load_source(base_name)
        rows.append(measure(base.model, base, label=f"{base_name} fp32", **opts))
        rows[-1].update(_text_perplexities(base, scored, args))
    for name, zm in zip(args.model, variants):
        if base is not None:
            zm.task = zm.task or base.task
            zm.tokenizer = zm.tokenizer or base.tokenizer
        ref = base.model if base is not None else None
        rows.append(measure(zm.model, zm, label=str(name), reference=ref, **opts))
        rows[-1].update(_text_perplexities(zm, scored, args))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    headers, table = _eval_table(rows)
    print(text_table(headers, table))
    ref = rows[0]
    if "ppl" in ref:
        print(f"perplexity: {ref['ppl_tokens']} tokens of held-out {ref['text']} text, seqlen {args.seqlen}")
    if "agreement" in ref:
        print(f"agreement: top-1 vs FP32 on the eval photo crops where FP32 is confident (p >= 0.5); "
              f"{ref['images']} crops")  # fmt: skip
    for r in rows:
        if "completion" in r:
            print(f"{r['variant']}: {r['completion']!r}")
    if args.report:
        path = _write_report(args.report, rows, headers, table)
        print(f"report -> {args.report} (plot {path.name})")
    return 0


def _eval_texts(args) -> tuple[list[str], dict[str, str]]:
    """``lowbit eval --domains`` / ``--text``: the built-in domains and ``{file name: text}`` to
    score perplexity on besides the default held-out text (both empty when neither is given),
    checked before any model is read. Raises CliError for unknown domains or an unreadable or
    empty file."""
    names: list[str] = []
    if args.domains is not None:
        from lowbit.evaluate import domains as D

        given = _domain_names(args.domains, "--domains")
        if "all" in given and len(given) > 1:
            raise CliError(f"--domains: 'all' stands alone (it scores every installed domain), got {args.domains!r}")
        try:
            names = D.available_domains() if given == ("all",) else D._resolve(given, (), "score")
        except D.DataError as e:
            raise CliError(f"--domains: {e}") from None
    texts = {}
    for path in args.text or ():
        text = _calib_text(path, "--text").strip()
        if not text:
            raise CliError(f"--text {path}: the file holds no text")
        texts[Path(path).name] = text
    return names, texts


def _text_perplexities(zm, scored: tuple[list[str], dict[str, str]], args) -> dict:
    """Perplexity of a language model on the domains and texts of :func:`_eval_texts` (the first
    --max-tokens tokens of each, windows of --seqlen), as ``{"texts": {"ppl NAME": ppl}}``."""
    names, texts = scored
    if not names and not texts:
        return {}
    if zm.task != "causal-lm" or zm.tokenizer is None:
        raise CliError("--domains and --text score language models (perplexity); this model is not one")
    from lowbit.evaluate import domains as D
    from lowbit.evaluate.perplexity import perplexity

    out = {}
    try:
        if names:
            found = D.domain_perplexities(zm.model, zm.tokenizer, names, max_tokens=args.max_tokens, seqlen=args.seqlen)
            out.update({f"ppl {d}": r.ppl for d, r in found.items()})
        for label, text in texts.items():
            out[f"ppl {label}"] = perplexity(zm.model, zm.tokenizer, text=text[: args.max_tokens * 8],
                                             max_tokens=args.max_tokens, seqlen=args.seqlen, source=label).ppl  # fmt: skip
    except D.DataError as e:
        raise CliError(f"--domains/--text: {e}") from None
    return {"texts": out}


def _default_baseline(source: str | None) -> str | None:
    """The model a quantized one is compared with: its source, a zoo model or a transformers
    checkpoint directory (a streamed model's), when that still exists and fits in memory as
    float32 (a note says so when it does not)."""
    from lowbit.models.zoo import ZOO

    if not source or source in ZOO:
        return source or None
    if not _is_checkpoint_dir(source):
        print(f"(no baseline: the source {source} recorded in the model is not a checkpoint directory from here; "
              "pass --baseline)", file=sys.stderr)  # fmt: skip
        return None
    from lowbit.checkpoint import Checkpoint
    from lowbit.memory import available_bytes

    ck = Checkpoint(source)
    fp32 = sum(ck.nbytes_of(n) * 4 // ck.dtype(n).itemsize if ck.dtype(n) else ck.nbytes_of(n) for n in ck.names())
    if fp32 > available_bytes() // 2:
        print(f"(no float32 baseline: the source {source} takes {fp32 / 1e9:.1f} GB as float32, more than half the "
              "memory available; pass --baseline)", file=sys.stderr)  # fmt: skip
        return None
    return source


def _eval_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    ref = rows[0]
    table = []
    for r in rows:
        cells = [r["variant"], f"{r['bytes'] / 1e6:.2f}", f"{r['linear_bpw']:.3f}", f"{r['compression']:.2f}x"]
        if "ppl" in r:
            cells += [f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%"]
        if "accuracy" in r:
            cells += [f"{100 * r['accuracy']:.2f}%", f"{100 * (r['accuracy'] - ref['accuracy']):+.2f}"]
        if "agreement" in r:
            cells += [f"{100 * r['agreement']:.1f}%", f"{r['kl']:.3f}"]
        if "tok_s" in r:
            cells += [f"{r['tok_s']:.1f}", f"{r['tok_s'] / ref['tok_s']:.2f}x"]
        if "img_s" in r:
            cells += [f"{r['img_s']:.1f}", f"{r['img_s'] / ref['img_s']:.2f}x"]
        cells += [f"{v:.3f}" for v in r.get("texts", {}).values()]
        table.append(cells)
    headers = ["variant", "MB", "bits/w", "vs fp32"]
    if "ppl" in ref:
        headers += ["ppl", "Δppl"]
    if "accuracy" in ref:
        headers += ["accuracy", "Δpts"]
    if "agreement" in ref:
        headers += ["agreement", "KL"]
    if "tok_s" in ref:
        headers += ["decode tok/s", "speed"]
    if "img_s" in ref:
        headers += ["images/s", "speed"]
    headers += list(ref.get("texts", {}))
    return headers, table


def _write_report(path: str, rows: list[dict], headers: list[str], table: list[list[str]]) -> Path:
    """Markdown report beside a size-vs-quality PNG with its Pareto front (both written atomically)."""
    import datetime

    from lowbit.evaluate.kernel_bench import machine_info
    from lowbit.evaluate.plots import pareto_front, tradeoff_plot
    from lowbit.evaluate.table import markdown_table
    from lowbit.files import write_text_atomic

    out = Path(path)
    ref = rows[0]
    if "ppl" in ref:
        key, ylabel = "ppl", "perplexity (held-out; lower is better)"
    elif "accuracy" in ref:
        key, ylabel = "error", "test error % (lower is better)"
        for r in rows:
            r["error"] = 100 * (1 - r["accuracy"])
    else:
        key, ylabel = "disagreement", "disagreement with FP32 % (lower is better)"
        for r in rows:
            r["disagreement"] = 100 * (1 - r["agreement"])
    pts = [{"label": r["variant"], "mb": r["bytes"] / 1e6, key: r[key]} for r in rows]
    png = out.with_suffix(".png")
    tradeoff_plot(pts, png, "mb", key, "model size (MB)", ylabel, "size vs quality")
    front = {rows[i]["variant"] for i in pareto_front([(p["mb"], p[key]) for p in pts])}
    m = machine_info()
    text = "\n".join([
        "# lowbit report",
        "",
        f"{datetime.date.today().isoformat()}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}. "
        "Sizes are bytes as stored (codes, scales, zero points, biases and float layers); speed is "
        "measured in this process, side by side (compare the ratios).",
        "",
        markdown_table(headers + ["Pareto"], [c + ["yes" if r["variant"] in front else ""] for c, r in zip(table, rows)]),
        "",
        f"![size vs quality]({png.name})",
        "",
    ])  # fmt: skip
    write_text_atomic(out, text)
    return png


# ---- inspect ------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    import lowbit
    from lowbit.evaluate.table import text_table
    from lowbit.io import read_manifest
    from lowbit.models.source import load_source
    from lowbit.nn import QuantModule

    manifest = read_manifest(args.model)
    device = _device_option(args.device)
    zm = load_source(args.model)
    model = zm.model
    if device is not None:
        from lowbit.kernels import use_kernel

        model.to(device)
        use_kernel(model)
    records = getattr(model, "lowbit_layers", {}) or {}
    size = {r.name: r for r in lowbit.size_of(model).layers}
    ref = None
    if args.error:
        from lowbit.models.zoo import ZOO, load_model

        src = manifest["model"].get("source")
        if src not in ZOO:
            return _err(f"--error needs the float original; source {src!r} is not a zoo model")
        ref = dict(load_model(src).model.named_modules())
    rows = []
    for name, rec in records.items():
        mod = model.get_submodule(name)
        sz = size.get(name)
        kernel = mod.kernel if isinstance(mod, QuantModule) else "-"
        note = mod.kernel_note if isinstance(mod, QuantModule) else ""
        if isinstance(mod, QuantModule) and mod.storage_note():
            note = "; ".join(x for x in (mod.storage_note(), note) if x)
        scheme = rec.scheme or (sz.scheme if sz else "-")
        if sz and sz.sparsity:
            scheme += f" ({sz.sparsity:.0%} pruned)"
        if isinstance(mod, QuantModule) and mod.rank:
            scheme += f" + rank {mod.rank}"
        resized = manifest["modules"].get(name, {}).get("resized")
        if resized:
            scheme += f" (resized from {'x'.join(map(str, resized))})"
        cells = [
            name,
            rec.type,
            rec.status,
            scheme,
            rec.method or "-",
            kernel,
            f"{sz.bytes:,}" if sz else "-",
            f"{sz.bits_per_weight:.3f}" if sz else "-",
        ]
        if ref is not None:
            if isinstance(mod, QuantModule) and name in ref:
                import torch

                from lowbit.nn import _linear_weight

                fm = ref[name]
                w = _linear_weight(fm) if mod.op == "linear" else fm.weight
                with torch.no_grad():
                    d = mod.dequantized().reshape(w.shape)
                    cells.append(f"{float((d - w).norm() / w.norm()):.4f}")
            else:
                cells.append("-")
        cells.append(rec.reason + (f"; {note}" if note else ""))
        rows.append(cells)
    headers = ["layer", "type", "status", "scheme", "method", "kernel", "bytes", "bits/w"]
    headers += ["rel.err"] if ref is not None else []
    headers += ["why"]
    print(text_table(headers, rows))
    from lowbit.kernels import cpu

    print(f"\n{cpu.summary()}")
    s = lowbit.size_of(model)
    import math

    shapes = {n: e.get("resized") or e["shape"] for n, e in manifest["modules"].items()}
    original = 4 * sum(math.prod(v) for v in shapes.values())  # FP32 bytes of the layers as first shaped
    resized = sum(1 for e in manifest["modules"].values() if e.get("resized"))
    note = (f" ({original / s.quantized_bytes:.2f}x against their FP32 size before {resized} were resized by "
            "structured pruning)" if resized and s.quantized_bytes else "")  # fmt: skip
    print(
        f"\n{len(s.quantized)} quantized layers: {s.quantized_bytes:,} bytes, {s.quantized_bits_per_weight:.3f} bits/weight, "
        f"{s.quantized_compression:.2f}x smaller than FP32{note}; whole model {s.total_bytes:,} bytes; "
        f"format_version {manifest['format_version']}, written by lowbit {manifest.get('lowbit_version')}"
    )
    if manifest.get("calibration"):
        print("calibrated on: " + ", ".join(f"{k} {v}" for k, v in manifest["calibration"].items()))
    return 0


# ---- sensitivity --------------------------------------------------------------------------------
def cmd_sensitivity(args) -> int:
    from lowbit.algorithms import get_algorithm
    from lowbit.evaluate.table import text_table
    from lowbit.mixed import Sensitivity, allocate, sensitivity
    from lowbit.models.source import load_source
    from lowbit.recipe import parse_choice

    _threads(args)
    budgets = [b for b in (args.target_bpw, args.max_loss) if b is not None]
    if len(budgets) > 1:
        return _err("give at most one of --target-bpw and --max-loss")
    if args.table:  # a table measured before: allocate (and plot) only
        sens = Sensitivity.load(args.table)
    else:
        cands = [c for c in args.candidates.split(",") if c.strip()]
        zm = load_source(args.model)
        static = any(s is not None and s.act_static for s, _ in map(parse_choice, cands))
        calibration = _calibration(args, zm) if get_algorithm(args.method).uses_calibration or static else None
        # the KL is measured on other calibration samples than the ones that set scales
        n = args.samples or {"classifier": 512, "image-classifier": 32}.get(zm.task, 8)
        batches = _model_inputs(zm, n, args.seqlen, args.seed + 1, args.calib, args.model,
                                getattr(args, "calib_domains", None))
        sens = sensitivity(zm.model, cands, batches, calibration=calibration, method=args.method,
                           observer=args.observer, base=args.base, cost=args.cost, progress=not args.quiet,
                           **({"sparsity": 0.0} if get_algorithm(args.method).prunes else {}))  # fmt: skip
        sens.info["model"] = args.model
    rows = []
    for n in sens.layers:
        cells = [n, f"{sens.params[n]:,}"]
        for c in sens.candidates:
            if c != "skip":
                cells.append(f"{sens.loss[n][c]:.3g}")
        rows.append(cells)
    print(text_table(["layer", "params"] + [f"KL {c}" for c in sens.candidates if c != "skip"], rows))
    if args.output:
        sens.save(args.output)
        print(f"sensitivity table -> {args.output}")
    alloc = None
    if budgets:
        alloc = allocate(sens, target_bpw=args.target_bpw, max_loss=args.max_loss)
        mix = ", ".join(f"{c} x{k}" for c, k in sorted(alloc.counts().items()))
        gap = f"{alloc.gap:.3g} nats" if alloc.objective == "loss" else f"{alloc.gap:,.0f} bytes"
        print(
            f"allocation: {mix}; {alloc.bpw:.3f} bits/weight ({alloc.nbytes:,} bytes), predicted KL "
            f"{alloc.loss:.4g} nats (sum over layers, measured alone); optimality gap {gap}"
        )
        if args.recipe_out:
            alloc.recipe().save(args.recipe_out)
            print(f"recipe -> {args.recipe_out}  (lowbit quantize MODEL --recipe {args.recipe_out})")
    if args.plot:
        from lowbit.evaluate.plots import sensitivity_plot

        sensitivity_plot(sens, args.plot, alloc.choice if alloc else None, title=str(sens.info.get("model", "")))
        print(f"plot -> {args.plot}")
    return 0


# ---- compress -----------------------------------------------------------------------------------
def _default_distill_samples(zm, args) -> int:
    """256 samples; for a language model at most the windows of --seqlen tokens that the
    calibration text (--calib, or the --calib-domains' calibration splits) holds."""
    if zm.tokenizer is None or zm.task in ("classifier", "image-classifier"):
        return 256
    from lowbit.evaluate.domains import max_calibration_samples

    text = _calib_text(args.calib) if args.calib is not None else None
    return max(1, min(256, max_calibration_samples(zm.tokenizer, _domain_names(args.calib_domains),
                                                   seqlen=args.seqlen, text=text)))


def cmd_compress(args) -> int:
    import lowbit
    from lowbit.algorithms import get_algorithm
    from lowbit.compress import compress
    from lowbit.models.source import load_source

    _threads(args)
    if args.target_ratio is None and args.target_bpw is None and args.max_loss is None:
        return _err("give --target-ratio R (or --target-bpw B) and/or --max-loss X")
    cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    fixed = {}
    for item in (args.fixed or "").split(","):
        if item.strip():
            if "=" not in item:
                return _err(f"--fixed takes PATTERN=CHOICE pairs, e.g. lm_head=w4g64; got {item!r}")
            pattern, choice = item.split("=", 1)
            choices = tuple(c.strip() for c in choice.split("|"))  # several: searched together
            if pattern.strip() in fixed:
                return _err(f"--fixed names {pattern.strip()!r} twice; give each pattern once")
            fixed[pattern.strip()] = choices if len(choices) > 1 else choices[0]
    for flag, v in (("--distill-samples", args.distill_samples), ("--samples", args.samples)):
        if v is not None and v < 1:
            return _err(f"{flag} takes a positive number of samples, got {v}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        return _err(f"--lr takes a positive learning rate, got {args.lr}")
    if args.max_loss is not None:
        from lowbit.mixed import parse_max_loss

        parse_max_loss(args.max_loss)  # a bad bound fails now, not after the measurement
    if Path(args.output).exists() and not Path(args.output).is_dir():
        return _err(f"-o {args.output} exists and is not a directory (a saved model is a directory)")
    t0 = time.perf_counter()
    zm = load_source(args.model)
    # the default method (SparseGPT or GPTQ) is calibrated; data-free ones given by name need none
    # (a --measure-method alone leaves the default method, which needs it)
    named = [m for m in (args.method, args.measure_method) if m]
    calibration = (None if args.method and not any(get_algorithm(m).uses_calibration for m in named)
                   else _calibration(args, zm))  # fmt: skip
    # costs are measured on other calibration samples than the ones that set scales
    n = args.samples if args.samples is not None else {"classifier": 512, "image-classifier": 32}.get(zm.task, 8)
    batches = _model_inputs(zm, n, args.seqlen, args.seed + 1, args.calib, args.model, args.calib_domains)
    distill = None
    if args.distill_steps or args.distill_blocks:
        n = _default_distill_samples(zm, args) if args.distill_samples is None else args.distill_samples
        distill = _model_inputs(zm, n, args.seqlen, args.seed + 2, args.calib, args.model, args.calib_domains)
    result = compress(zm.model, target_ratio=args.target_ratio, target_bpw=args.target_bpw, max_loss=args.max_loss,
                      batches=batches, calibration=calibration, candidates=cands, method=args.method,
                      measure_method=args.measure_method, cost=args.cost, fixed=fixed or None,
                      base=args.base, channels=args.channels, distill_steps=args.distill_steps,
                      distill_blocks=args.distill_blocks, distill_data=distill, lr=args.lr,
                      progress=not args.quiet)  # fmt: skip
    out = lowbit.save(result.model, args.output, tokenizer=zm.tokenizer,
                      source=getattr(zm.model, "lowbit_source", None) or args.model)  # fmt: skip
    # a lowbit save is a directory: the model is its safetensors files and manifest; the tokenizer
    # and configuration files beside them are the same whatever the compression
    files = [f for f in out.iterdir() if f.is_file()]
    model_bytes = sum(f.stat().st_size for f in files if f.suffix == ".safetensors" or f.name == "lowbit.json")
    other_bytes = sum(f.stat().st_size for f in files) - model_bytes
    print(f"compressed {args.model} in {time.perf_counter() - t0:.1f}s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in result.seconds.items())}): {result.summary()}")  # fmt: skip
    print(f"saved -> {out}: the model files (safetensors and manifest) {model_bytes:,} bytes, "
          f"{result.reference_bytes / model_bytes:.2f}x smaller than the FP32 tensors (headers and manifest add "
          f"{model_bytes - result.nbytes:,} bytes)" + (f"; tokenizer and config files {other_bytes:,} bytes"
                                                      if other_bytes else ""))  # fmt: skip
    if args.recipe_out:
        result.recipe.save(args.recipe_out)
        print(f"recipe -> {args.recipe_out}")
    if args.plot:
        from lowbit.evaluate.plots import compress_plot

        compress_plot(result, args.plot, title=f"{args.model}: {result.ratio:.1f}x")
        print(f"plot -> {args.plot}")
    return 0


# ---- estimate -----------------------------------------------------------------------------------
def cmd_estimate(args) -> int:
    import lowbit

    if args.model and _is_checkpoint_dir(args.model):  # headers only: any size
        from lowbit.estimate import estimate_checkpoint

        spec = lowbit.Recipe.load(args.recipe) if args.recipe else args.scheme
        print(estimate_checkpoint(args.model, spec, max_shard_bytes=args.shard_size, method=args.method,
                                  nsamples=args.nsamples, seqlen=args.seqlen).table())  # fmt: skip
        return 0
    if args.model:
        from lowbit.models.source import load_source

        est = lowbit.estimate(model=load_source(args.model).model, scheme=args.scheme)
    else:
        if args.params is None:
            return _err("give --params (e.g. 70e9) or --model")
        est = lowbit.estimate(params=args.params, scheme=args.scheme)
    print(est.table())
    return 0


# ---- bench --------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    import torch

    from lowbit.evaluate.kernel_bench import SHAPES, STREAM_READ, machine_info, run_kernel_bench
    from lowbit.evaluate.table import text_table

    torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    log = None if args.quiet else (lambda s: print(f"  timing {s}", file=sys.stderr))
    rows = run_kernel_bench(tuple(args.schemes), shapes=shapes, reps=args.reps, progress=log)
    info = machine_info()
    base = {r.shape: r.seconds for r in rows if r.variant == "torch fp32"}
    table = [[r.label, r.variant, f"{r.seconds * 1e3:.3f}",
              "-" if r.variant == STREAM_READ else f"{base[r.shape] / r.seconds:.2f}x",
              f"{r.weight_bytes / r.seconds / 1e9:.1f}" if r.shape[0] == 1 and r.weight_bytes > 0 else "-"]
             for r in rows]  # fmt: skip
    from lowbit.kernels import cpu

    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}; medians")
    print(cpu.summary())
    print(text_table(["shape", "variant", "ms", "speed vs fp32", "GB/s read"], table))
    return 0


# ---- formats ------------------------------------------------------------------------------------
def cmd_formats(args) -> int:
    from lowbit.estimate import bits_per_weight
    from lowbit.evaluate.table import text_table
    from lowbit.formats import FORMATS
    from lowbit.scheme import GRAMMAR, PRESETS

    print(text_table(["format", "kind", "bits", "storage", "about"],
                     [[f.name, f.kind, f.bits, f.storage, f.doc] for f in FORMATS.values()]))  # fmt: skip
    print()
    print(text_table(["scheme", "bits/weight (K=4096)"], [[p, f"{bits_per_weight(p, 4096):.3f}"] for p in PRESETS]))
    print(f"\n{GRAMMAR}")
    return 0


# ---- demo ---------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from lowbit.demo import run_demo

    run_demo(max_tokens=args.max_tokens, threads=args.threads)
    return 0


# ---- generate -----------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    import torch

    import lowbit
    from lowbit.models.source import load_source

    _threads(args)
    device = _device_option(args.device)
    zm = load_source(args.model)
    if zm.tokenizer is None:
        return _err(f"{args.model} has no tokenizer to encode the prompt with")
    if device is not None:
        zm.model.to(device)  # packed weights as stored; the kernels there are chosen at the first call
    if not args.prompt:
        return _err("empty prompt: give --prompt TEXT")
    ids = zm.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    tokens: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    first = None

    def show(tok: int) -> None:  # print the text as it grows (tokens can be parts of characters)
        nonlocal shown, first
        first = first or time.perf_counter()
        tokens.append(tok)
        text = zm.tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text

    eos = [] if args.ignore_eos else None
    with torch.no_grad():
        lowbit.generate(zm.model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        seed=args.seed, kv_cache=args.kv_cache, eos_token_id=eos, on_token=show)  # fmt: skip
    end = time.perf_counter()
    rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 else float("nan")
    print(f"\n[{ids.shape[1]} prompt tokens, {len(tokens)} new; first token after {first - t0:.2f}s, then "
          f"{rate:.1f} tokens/s; kv cache {args.kv_cache}]", file=sys.stderr)  # fmt: skip
    return 0


# ---- export -------------------------------------------------------------------------------------
def _export_checks(args) -> None:
    """What ``lowbit export`` can refuse before loading or quantizing anything (CliError)."""
    import lowbit
    from lowbit.scheme import SchemeError

    out = args.output
    file_out = args.to in ("gguf", "onnx")
    if not out.strip():
        raise CliError("-o is empty; give the output path")
    if (args.scheme is not None) and (args.recipe is not None):
        raise CliError("give at most one of --scheme or --recipe")
    if args.exact and args.requantize:
        raise CliError("--exact refuses layers without an exact mapping; --requantize says what they become: "
                       "give one of them")  # fmt: skip
    quantizing = args.scheme is not None or args.recipe is not None
    if not quantizing and not args.llama_quantize:
        given = [f for f, v in (("--method", args.method != "rtn"), ("--calib", args.calib),
                                ("--calib-domains", args.calib_domains)) if v not in (None, False)]  # fmt: skip
        if given:
            raise CliError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} when the export quantizes (--scheme / --recipe, or "
                           "--llama-quantize's importance matrix)")  # fmt: skip
    path = Path(out)
    if file_out and (path.is_dir() or out.endswith(("/", os.sep))):
        what = "is a directory" if path.is_dir() else "names a directory"
        raise CliError(f"{out} {what}; --to {args.to} writes a file (e.g. {path / ('model.' + args.to)})")
    if path.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to replace it")
    src = Path(args.model)
    if src.is_dir():
        s, o = src.resolve(), path.resolve()
        if o == s or (s in o.parents and o.exists()):
            raise CliError(f"{out} is part of the source model {args.model}; write the export elsewhere")
    if args.to == "gguf":
        from lowbit.io.gguf import FLOAT_TYPES, REQUANT_TYPES

        for attr in ("requantize", "float_type", "llama_quantize"):
            if getattr(args, attr):
                setattr(args, attr, getattr(args, attr).upper())  # GGUF type names, as llama.cpp spells them
        if args.requantize and args.requantize not in REQUANT_TYPES:
            raise CliError(f"--requantize for gguf is one of {', '.join(REQUANT_TYPES)}, got {args.requantize!r}")
        if args.float_type and args.float_type not in FLOAT_TYPES:
            raise CliError(f"--float-type is one of {', '.join(FLOAT_TYPES)}, got {args.float_type!r}")
    elif args.requantize:
        try:
            lowbit.parse_scheme(args.requantize)
        except SchemeError as e:
            raise CliError(f"--requantize for {args.to} takes a lowbit scheme (e.g. w8, w4g32): {e}") from None
    if args.to != "gguf" and (args.float_type or args.tokenizer_gguf):
        raise CliError("--float-type and --tokenizer-gguf apply to --to gguf")
    if args.to != "compressed-tensors" and args.dtype:
        raise CliError("--dtype applies to --to compressed-tensors")
    if args.tokenizer_gguf and not Path(args.tokenizer_gguf).is_file():
        raise CliError(f"--tokenizer-gguf {args.tokenizer_gguf}: no such file")
    if args.to != "onnx" and (args.accuracy_level is not None or args.input_shape):
        raise CliError("--accuracy-level and --input-shape apply to --to onnx")
    if args.llama_quantize:
        from lowbit.io.gguf import llama_quantize_types

        if args.to != "gguf":
            raise CliError("--llama-quantize applies to --to gguf")
        clash = [f for f, v in (("--scheme", args.scheme), ("--recipe", args.recipe), ("--exact", args.exact),
                                ("--requantize", args.requantize), ("--float-type", args.float_type)) if v]  # fmt: skip
        if clash:
            raise CliError(f"--llama-quantize quantizes the float model with llama.cpp's quantizer; drop {', '.join(clash)}")
        types = llama_quantize_types()
        if args.llama_quantize not in types:
            raise CliError(f"--llama-quantize takes a llama.cpp file type ({', '.join(types)}), got {args.llama_quantize!r}")
    elif not args.imatrix:
        raise CliError("--no-imatrix applies with --llama-quantize")
    if quantizing and (src / "lowbit.json").is_file():
        raise CliError(f"{args.model} is already quantized; --scheme / --recipe quantize a float source first")


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 2 else f"{len(names)} layers ({names[0]} ... {names[-1]})"


def _pct(lo: float, hi: float) -> str:
    if lo != lo or hi != hi:  # NaN: not measured (the reason is in the line)
        return "n/a"
    return f"{100 * hi:.3f}%" if abs(hi - lo) < 5e-6 else f"{100 * lo:.3f}-{100 * hi:.3f}%"


def _export_lines(rep, every: bool, by: str = "") -> list[str]:
    """The report's layers that are not simply exact, one line per kind (``every``: per layer)."""
    groups: dict[tuple, list] = {}
    for t in rep.entries:
        if t.mapping in ("exact", "weights exact", "float") and not t.why:
            continue
        key = (t.scheme, t.target, t.mapping, t.why, t.name if every else "")
        groups.setdefault(key, []).append(t)
    lines = []
    for (scheme, target, mapping, why, _), ts in groups.items():
        names = _names([t.source if t.scheme != "-" else t.name for t in ts])
        errs = [t.rel_rms_error for t in ts]
        frm = scheme if scheme != "-" else "float"
        because = f" ({why})" if why else ""
        if mapping == "zero point rounded":
            lines.append(f"{names}: {scheme} -> {target}, zero point rounded to float16 in "
                         f"{_pct(min(1 - t.exact_fraction for t in ts), max(1 - t.exact_fraction for t in ts))} "
                         f"of blocks (a weight moves by up to {max(t.max_abs_error for t in ts):.2e})")  # fmt: skip
        elif mapping in ("requantized", "scales rounded", "rounded"):
            lines.append(f"{names}: {frm} -> {target}{by if scheme == '-' else ''}{because}, added error {_pct(min(errs), max(errs))} of the "
                         "weight's RMS")  # fmt: skip
        else:
            lines.append(f"{names}: {frm} -> {target} {mapping}{because}")
    return lines


def cmd_export(args) -> int:
    import torch

    import lowbit
    from lowbit.models.source import load_source

    _threads(args)
    _export_checks(args)
    shape = None
    if args.input_shape is not None:
        try:
            shape = tuple(int(d) for d in args.input_shape.split(","))
            if not shape or min(shape) < 1:
                raise ValueError
        except ValueError:
            return _err(f"--input-shape takes positive integers separated by commas (e.g. 1,3,224,224), got {args.input_shape!r}")
    zm = load_source(args.model)
    model = zm.model
    if shape is not None and hasattr(model, "config"):
        return _err("--input-shape is for models that are not transformers models (those take input_ids)")
    if args.to == "gguf":  # what the GGUF writer would refuse, before minutes of quantizing
        from lowbit.io.gguf import check_gguf_source

        check_gguf_source(model, args.tokenizer_gguf)
    if args.scheme or args.recipe:
        from lowbit.algorithms import get_algorithm

        spec = lowbit.Recipe.load(args.recipe) if args.recipe else lowbit.parse_scheme(args.scheme)
        calibration = _calibration(args, zm) if get_algorithm(args.method).uses_calibration or _has_static(spec) else None
        model = lowbit.quantize(model, spec, method=args.method, calibration=calibration, progress=not args.quiet)
    options = {"exact": args.exact, "overwrite": args.force}
    if args.requantize:
        options["requantize"] = args.requantize
    if args.to == "gguf":
        if args.tokenizer_gguf:
            options["tokenizer_gguf"] = args.tokenizer_gguf
        if args.llama_quantize:
            del options["exact"]
            options["llama_quantize"] = args.llama_quantize
            if args.imatrix:
                from lowbit.io.gguf import importance_matrix

                options["importance"] = importance_matrix(model, _calibration(args, zm))
        else:
            options["float_type"] = args.float_type or "F32"
    if args.to == "compressed-tensors":
        options["dtype"] = args.dtype or "float32"
        options["tokenizer"] = zm.tokenizer
    if args.to == "onnx":
        from lowbit.models.zoo import INPUT_SHAPES

        if args.accuracy_level is not None:
            options["accuracy_level"] = args.accuracy_level
        src = getattr(model, "lowbit_source", None) or zm.source
        shape = shape or INPUT_SHAPES.get(src) or INPUT_SHAPES.get(args.model)
        if shape is not None:
            options["example_inputs"] = torch.rand(shape)
    t0 = time.perf_counter()
    rep = lowbit.export(model, args.to, args.output, **options)
    secs = time.perf_counter() - t0
    if not args.quiet:
        for line in _export_lines(rep, args.verbose, " by llama.cpp" if args.llama_quantize else ""):
            print(f"  {line}")
        for note in rep.notes:
            print(f"  note: {note}")
    print(f"exported {args.model} to {args.to} in {secs:.1f}s: {rep.summary()}; {_size(rep.nbytes)} -> {rep.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__
    from lowbit.algorithms import ALGORITHMS
    from lowbit.algorithms.gptq import CLIP_CHOICES as GPTQ_CLIPS
    from lowbit.algorithms.rtn import CLIP_CHOICES
    from lowbit.compress import DEFAULT_CANDIDATES
    from lowbit.export import EXPORT_FORMATS
    from lowbit.kernels import KERNELS
    from lowbit.models.zoo import ZOO
    from lowbit.observers import OBSERVERS

    p = argparse.ArgumentParser(prog="lowbit", description="Quantize PyTorch models and measure the cost.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    zoo = ", ".join(ZOO)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help=f"zoo model ({zoo}) or a transformers model directory")
    q.add_argument("--scheme", help="scheme string, e.g. int8, w4g64, w4g64-asym (see `lowbit formats`)")
    q.add_argument("--recipe", help="a recipe JSON file (per-layer schemes)")
    q.add_argument("--method", default="rtn", choices=sorted(ALGORITHMS))
    q.add_argument("--clip", choices=sorted({*CLIP_CHOICES, *GPTQ_CLIPS, "awq"}),
                   help="how group ranges are chosen: rtn minmax (default) or mse; gptq and awq+gptq hessian "
                        "(default), mse or minmax; awq+gptq also awq (AWQ's output-error search)")
    q.add_argument("--calib", help="calibration text file (default: the built-in text domains, mixed)")
    q.add_argument("--calib-domains", metavar="NAMES",
                   help="built-in text domains to calibrate on, comma-separated: python-docs, licences, handbook, "
                        "quotes, or mixed (the default: every one present)")
    q.add_argument("--nsamples", type=int, default=64, help="calibration samples (default 64)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    q.add_argument("--seed", type=int, default=0, help="which calibration samples are drawn")
    q.add_argument("--damp", type=float, help="gptq: Hessian damping, fraction of its mean diagonal (0.01)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: quantize columns in order of decreasing activation energy (default on)")
    q.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq, awq, awq+gptq: shrink E[x x^T] toward its diagonal by the calibration's token "
                        "count (default on; --no-shrink: the plain sample moment, as the papers)")
    q.add_argument("--alpha", type=float, help="smoothquant: migration strength in [0, 1] (0.5)")
    q.add_argument("--observer", default="minmax", choices=list(OBSERVERS),
                   help="static activation schemes (w8a8-static): how input ranges are chosen (minmax)")
    q.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="static schemes: move each layer's mean output error into its bias "
                        "(default: layers that have a bias; --bias-correction adds one where missing)")
    q.add_argument("--importance", type=float,
                   help="hqq: weight each error by |w|^importance (default 1.5 symmetric, 0.5 asymmetric; 0 = paper)")
    q.add_argument("--sparsity", type=float,
                   help="magnitude, wanda, sparsegpt: fraction of each layer's weights removed, in [0, 1) (with a "
                        "grouped scheme rounded so each group keeps a multiple of 8)")
    q.add_argument("--nm", metavar="N:M", help="magnitude, wanda, sparsegpt: keep N of every M weights, e.g. 2:4")
    q.add_argument("--correction-rank", type=int, metavar="R",
                   help="give each quantized linear layer a float16 rank-R correction of its weight error (weighted "
                        "by the calibration inputs for calibrated methods: EoRA), counted in its size")
    q.add_argument("--kernel", default="auto", choices=["auto"] + sorted({k.name for k in KERNELS}))
    q.add_argument("-o", "--output", required=True, help="output directory")
    q.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read a checkpoint directory layer by layer instead of loading the model (default: on for "
                   "a transformers checkpoint directory, any method; calibrated ones go block by block)")
    q.add_argument("--shard-size", type=_bytes, default="512MiB", metavar="SIZE",
                   help="largest output tensor file, e.g. 512MiB (default), 2GB: the streaming peak includes two (one "
                   "being filled while the one before it is written)")
    q.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="streamed on a Ray cluster (host:port, or auto: the cluster this node belongs to, which also "
                   "works where the cluster requires Ray's authentication token; no address: start one here): data-free "
                   "methods quantize the layers there (reading the checkpoint at the same path); calibrated ones "
                   "split the calibration batches across workers, which send back their statistics per block")
    q.add_argument("--ray-workers", type=int,
                   help="layers in flight, or calibration workers, on Ray (default: the cluster's CPUs)")
    q.add_argument("--threads", type=int)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="measure a model against its FP32 original")
    e.add_argument("model", nargs="+", help="lowbit model directories (or zoo models), compared side by side")
    e.add_argument("--baseline", help="zoo model or transformers checkpoint directory to compare with (default: the model's source)")
    e.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens for perplexity")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--images", type=int, default=256, help="eval photo crops for ImageNet models (default 256)")
    e.add_argument("--domains", metavar="NAMES",
                   help="language models: perplexity also on the eval split of each built-in text domain "
                        "(comma-separated: python-docs, licences, handbook, quotes; 'all'), one column each")  # fmt: skip
    e.add_argument("--text", action="append", metavar="FILE",
                   help="language models: perplexity also on this UTF-8 text (your own domain; repeatable)")
    e.add_argument("--no-speed", action="store_true", help="skip the decode speed measurement")
    e.add_argument("--json", action="store_true")
    e.add_argument("--report", help="write a Markdown report (and a size-vs-quality PNG beside it)")
    e.add_argument("--threads", type=int)
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="per-layer table of a saved model")
    i.add_argument("model", help="a lowbit model directory")
    i.add_argument("--error", action="store_true", help="relative weight error vs the zoo original")
    i.add_argument("--device", default=None, help="show the kernels each layer runs on this device (e.g. cuda)")
    i.set_defaults(fn=cmd_inspect)

    m = sub.add_parser("sensitivity", help="per-layer sensitivity; with a budget, a mixed-precision recipe")
    m.add_argument("model", help=f"zoo model ({zoo}) or a transformers model directory")
    m.add_argument("--candidates", default="w3g64,w4g64,int8",
                   help="comma-separated schemes to measure per layer ('skip' = keep float); default w3g64,w4g64,int8")
    m.add_argument("--table", help="a sensitivity table saved with -o: allocate and plot without measuring")
    m.add_argument("--base", help="measure around this candidate (every layer quantized with it) instead of FP32")
    m.add_argument("--method", default="rtn", choices=["rtn", "hqq", "gptq", "magnitude", "wanda", "sparsegpt"],
                   help="pruning methods (for candidates such as w4g64+50%%) leave the other candidates dense")
    m.add_argument("--cost", default="kl", choices=["kl", "hessian"],
                   help="kl: measure the KL with each layer quantized alone; hessian: predict it from Hessian "
                        "traces and weight error (one backward pass per sample, weights only; not with --base)")
    m.add_argument("--observer", default="minmax", choices=list(OBSERVERS))
    m.add_argument("--samples", type=int,
                   help="samples the KL is measured on (default: 8 texts, 32 photo crops, 512 digits)")
    m.add_argument("--nsamples", type=int, default=64, help="calibration samples, when needed (default 64)")
    m.add_argument("--seqlen", type=int, default=256, help="tokens per sample (language models; default 256)")
    m.add_argument("--calib", help="calibration text file (default: the built-in text domains, mixed)")
    m.add_argument("--calib-domains", metavar="NAMES",
                   help="built-in text domains to calibrate on, comma-separated (default: mixed)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--target-bpw", type=float, help="allocate: average stored bits per weight")
    m.add_argument("--max-loss", help="allocate: the smallest model whose summed KL stays within this "
                   "(nats, or a percentage: 1%% = a 1%% perplexity rise)")
    m.add_argument("--recipe-out", help="write the allocation as a recipe JSON")
    m.add_argument("-o", "--output", help="save the sensitivity table (JSON)")
    m.add_argument("--plot", help="write a PNG of the per-layer sensitivity (and the allocation)")
    m.add_argument("--threads", type=int)
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(fn=cmd_sensitivity)

    c = sub.add_parser("compress", help="to a size budget: quantization, pruning and low-rank corrections chosen "
                       "per layer by measured sensitivity, then optional distillation from FP32")
    c.add_argument("model", help=f"zoo model ({zoo}) or a transformers model directory")
    c.add_argument("--target-ratio", type=float, help="FP32 bytes / compressed bytes for the whole model, e.g. 12")
    c.add_argument("--target-bpw", type=float, help="instead of --target-ratio: stored bits per weight of the "
                   "searched layers (masks and corrections included), e.g. 3.2")
    c.add_argument("--max-loss", help="the predicted KL bound (nats, or a percentage: 2%% = a 2%% perplexity rise); "
                   "alone: the smallest model within it")
    c.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                   help="choices measured per layer: a scheme, +N%% pruned, +N:M, +rN corrected, or skip "
                        f"(default {','.join(DEFAULT_CANDIDATES).replace('%', '%%')})")
    c.add_argument("--method", help="sparsegpt (default), wanda or magnitude (data-free); rtn/hqq/gptq/awq/awq+gptq "
                   "when no candidate prunes")
    c.add_argument("--measure-method", help="the method the costs are measured with (default --method; rtn when "
                   "--method moves scales between layers: awq, awq+gptq)")
    c.add_argument("--cost", choices=("kl", "hessian"), default="kl",
                   help="kl: each layer and candidate measured (default); hessian: predicted from Hessian traces "
                        "(much faster, coarser)")
    c.add_argument("--fixed", metavar="PATTERN=CHOICE,...",
                   help="layers outside the search with their choice, e.g. model.embed_tokens=w4g64,lm_head=w4g64; "
                        "several choices separated by | are searched together (model.embed_tokens=w8|w4g64|w3g64,"
                        "lm_head=w8|w4g64|w3g64)")
    c.add_argument("--channels", type=float, metavar="FRACTION",
                   help="first remove this share of the channels of every channel group (structured pruning: "
                        "transformer FFN neurons, chained Linear/Conv2d channels); the config follows")
    c.add_argument("--base", help="measure costs around this candidate instead of FP32")
    c.add_argument("--distill-steps", type=int, default=0, help="distillation steps from the FP32 model (default 0)")
    c.add_argument("--distill-blocks", type=int, default=0, metavar="EPOCHS",
                   help="passes of block-wise distillation from the FP32 model before --distill-steps "
                        "(transformers: each layer fitted to the FP32 layer's output; default 0)")
    c.add_argument("--distill-samples", type=int, help="samples to distil on (default 256; language models: as many "
                   "windows of --seqlen tokens as the calibration text holds, up to 256)")
    c.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate of the weights (default 1e-4)")
    c.add_argument("--samples", type=int, help="samples the KL is measured on (default: 8 texts, 32 crops, 512 digits)")
    c.add_argument("--nsamples", type=int, default=64, help="calibration samples (default 64)")
    c.add_argument("--seqlen", type=int, default=256, help="tokens per sample (language models; default 256)")
    c.add_argument("--calib", help="calibration text file (default: the built-in text domains, mixed)")
    c.add_argument("--calib-domains", metavar="NAMES", help="built-in text domains to calibrate on (default mixed)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-o", "--output", required=True, help="where to save the compressed model")
    c.add_argument("--recipe-out", help="write the chosen recipe as JSON")
    c.add_argument("--plot", help="write a PNG of size vs KL (the frontier and the result)")
    c.add_argument("--threads", type=int)
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(fn=cmd_compress)

    s = sub.add_parser("estimate", help="weight memory in each format; for a checkpoint directory also the "
                       "output size and peak memory of streamed quantization and of loading")
    s.add_argument("--params", type=float, help="parameter count, e.g. 70e9")
    s.add_argument("--model", help="a zoo model or model directory instead of --params")
    s.add_argument("--scheme", default="w4g128")
    s.add_argument("--recipe", help="a recipe JSON file (with a checkpoint directory)")
    s.add_argument("--shard-size", type=_bytes, default="512MiB", metavar="SIZE",
                   help="output shard size the quantization peak assumes (checkpoint directories)")
    s.add_argument("--method", default="rtn", choices=sorted(ALGORITHMS),
                   help="method the quantization peak assumes (checkpoint directories; calibrated ones add a block's work)")
    s.add_argument("--nsamples", type=int, default=64, help="calibration windows the peak assumes (calibrated methods)")
    s.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (calibrated methods)")
    s.set_defaults(fn=cmd_estimate)

    b = sub.add_parser("bench", help="kernel speed vs torch FP32/BF16")
    b.add_argument("--schemes", nargs="+", default=["int8", "w4g128", "w4g64"])
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--reps", type=int, default=30)
    b.add_argument("--quick", action="store_true", help="only the 4096x4096 GEMV")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("demo", help="quantize smollm2-135m to BF16/INT8/INT4 and compare with FP32")
    d.add_argument("--max-tokens", type=int, default=8192)
    d.add_argument("--threads", type=int, default=2)
    d.set_defaults(fn=cmd_demo)

    g = sub.add_parser("generate", help="stream a batch-1 decode from a Llama-family model")
    g.add_argument("model", help=f"zoo model ({zoo}), a lowbit model directory, or a transformers directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--kv-cache", choices=["float32", "int8"], default="float32")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--device", default=None, help="run on this device (e.g. cuda: the GPU kernels)")
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="write a model in a runtime's format (gguf: llama.cpp; compressed-tensors: "
                       "transformers / vLLM; onnx: ONNX Runtime)")
    x.add_argument("model", help=f"a lowbit model directory, or a zoo model ({zoo}) / transformers directory "
                   "quantized first with --scheme / --recipe")
    x.add_argument("--to", required=True, choices=sorted(EXPORT_FORMATS), help="target format")
    x.add_argument("-o", "--output", required=True, help="output file (gguf, onnx) or directory (compressed-tensors)")
    x.add_argument("--force", action="store_true", help="replace an existing output (compressed-tensors: only an "
                   "earlier compressed-tensors export)")
    x.add_argument("--scheme", help="quantize a float source with this scheme first")
    x.add_argument("--recipe", help="... or with this recipe JSON file")
    x.add_argument("--method", default="rtn", choices=sorted(ALGORITHMS), help="method for --scheme / --recipe")
    x.add_argument("--exact", action="store_true", help="refuse (naming them) layers whose values the format "
                   "cannot hold exactly instead of requantizing them; onnx still writes a quantized convolution or "
                   "embedding it has no operator for as its exact float32 values (reported)")
    x.add_argument("--requantize", metavar="TYPE",
                   help="what layers without an exact mapping become (gguf: a GGUF type, Q8_0 default, Q4_0, Q4_1, "
                   "Q5_0, Q5_1, F16, BF16, F32; compressed-tensors and onnx: a lowbit scheme, w8 default)")
    x.add_argument("--float-type", help="gguf: unquantized 2-D weights (F32 exact, default; F16, BF16, Q8_0)")
    x.add_argument("--llama-quantize", metavar="TYPE", help="gguf: quantize the float model with llama.cpp's own "
                   "quantizer to this file type (Q4_K_M, Q5_K_M, Q6_K, IQ4_XS, ...) instead of writing lowbit's codes")
    x.add_argument("--imatrix", action=argparse.BooleanOptionalAction, default=True,
                   help="with --llama-quantize: an importance matrix lowbit measures on the calibration text "
                   "(--calib / --calib-domains, --nsamples, --seqlen; default on)")
    x.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compressed-tensors: dense tensors and config dtype (float32 exact, default)")
    x.add_argument("--tokenizer-gguf", metavar="FILE", help="gguf: copy the tokenizer metadata from this GGUF "
                   "(same vocabulary; the zoo's smollm2-135m uses its own)")
    x.add_argument("--accuracy-level", type=int, choices=[1, 4],
                   help="onnx: MatMulNBits arithmetic for weight-only layers (1: float32 on the exact weights, "
                   "default; 4: ONNX Runtime rounds activations to int8 per block, faster)")
    x.add_argument("--input-shape", metavar="DIMS", help="onnx: one input's shape for a model that is not a "
                   "transformers model (e.g. 1,3,224,224; the zoo's image models have theirs)")
    x.add_argument("--nsamples", type=int, default=64, help="calibration samples (default 64)")
    x.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    x.add_argument("--seed", type=int, default=0, help="which calibration samples are drawn (default 0)")
    x.add_argument("--calib", help="calibration text file (calibrated methods, the importance matrix)")
    x.add_argument("--calib-domains", metavar="NAMES", help="built-in text domains to calibrate on, comma-separated "
                   "(python-docs, licences, handbook, quotes; default mixed)")
    x.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    x.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    x.add_argument("-v", "--verbose", action="store_true", help="one line per layer that is not exact "
                   "(default: one line per kind)")
    x.set_defaults(fn=cmd_export)

    f = sub.add_parser("formats", help="the format table and scheme presets")
    f.set_defaults(fn=cmd_formats)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, Kubernetes) turned into an exception, so that the
    writers' clean-up runs as it does for Ctrl-C."""


def _on_sigterm(_signum, _frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    from lowbit.calibrate import CalibrationError
    from lowbit.distributed import RayError
    from lowbit.driver import QuantizeError, UnsupportedModuleError
    from lowbit.evaluate.data import DataError
    from lowbit.generate import GenerateError
    from lowbit.io import LowbitFormatError
    from lowbit.kernels import KernelError
    from lowbit.mixed import MixedPrecisionError
    from lowbit.models.source import SourceError
    from lowbit.models.zoo import ZooError
    from lowbit.primitives import NonFiniteError
    from lowbit.recipe import RecipeError
    from lowbit.scheme import SchemeError

    try:
        return args.fn(args)
    except BrokenPipeError:  # `lowbit inspect ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        return 0
    except (SchemeError, RecipeError, LowbitFormatError, SourceError, ZooError, QuantizeError,
            UnsupportedModuleError, KernelError, NonFiniteError, FileNotFoundError, CalibrationError, DataError,
            CliError, MixedPrecisionError, GenerateError, RayError, ValueError, OSError) as e:  # fmt: skip
        return _err(str(e))
    except KeyboardInterrupt as e:
        _err("interrupted: nothing was written (an output from an earlier run is kept as it was)")
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
