"""Lean batch-1 decoding for Llama-family causal LMs (SmolLM2, Llama, Mistral, Qwen2 layouts).

:func:`generate` runs the model's own modules (quantized ``QuantLinear``/``QuantEmbedding`` or
float) through a short decode loop instead of transformers' ``generate``: the key/value cache
is allocated once for the whole run, ``(layers, kv_heads, positions, head_dim)``, and written in
place; rotary tables are computed once; each step runs the embedding, per layer the two norms,
the seven projections and one attention call, then the final norm and the LM head on the last
position only. Greedy decoding gives the same tokens as transformers' ``generate`` on the same
weights (tests compare them).

Optional int8 KV cache (``kv_cache="int8"``): keys and values are stored as int8 with one
float32 scale per (layer, head, position), ``absmax / 127`` of that head's vector, and
dequantized for attention; it stores ``head_dim + 4`` bytes per vector instead of
``4 * head_dim``.

Architecture (the modules read, ``config`` fields used): ``model.model.embed_tokens``,
``model.model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}``, ``model.model.norm``, ``model.lm_head``; ``num_attention_heads``,
``num_key_value_heads``, ``head_dim`` (or ``hidden_size / heads``), ``max_position_embeddings``,
``rope_theta`` or ``rope_parameters`` with rope type ``default``, ``hidden_act`` ``silu``.
Rotary embeddings follow RoFormer (Su et al., 2021) in the half-rotation form transformers'
Llama uses; attention is ``softmax(q k^T / sqrt(head_dim)) v`` with grouped key/value heads
(Ainslie et al., 2023, GQA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["generate", "stream", "Decoder", "GenerateError"]


class GenerateError(ValueError):
    """A model lowbit's decoder cannot run, or a prompt/length it cannot take."""


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise GenerateError(f"rope type {kind!r} is not supported by lowbit's decoder (default rotary only)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise GenerateError("the config gives no rope_theta")
    return float(theta)


@dataclass(frozen=True)
class _Arch:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    theta: float


def _arch(model) -> _Arch:
    """Check ``model`` is a Llama-family causal LM this decoder runs; raise :class:`GenerateError`
    naming what is missing otherwise."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    missing = [n for n, ok in (("config", cfg is not None), ("model.model", inner is not None),
                               ("lm_head", hasattr(model, "lm_head"))) if not ok]  # fmt: skip
    if not missing:
        missing = [n for n in ("embed_tokens", "layers", "norm") if not hasattr(inner, n)]
    if missing:
        raise GenerateError(
            f"{type(model).__name__} is not a Llama-family decoder (no {', '.join(missing)}); lowbit.generate runs "
            "LlamaForCausalLM-style models"
        )
    need = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    for i, layer in enumerate(inner.layers):
        for n in need:
            try:
                layer.get_submodule(n)
            except AttributeError:
                raise GenerateError(f"layer {i} has no {n}: not a Llama-family decoder layer") from None
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise GenerateError(f"hidden_act {act!r}: lowbit's decoder runs SiLU-gated MLPs")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and cfg.sliding_window < cfg.max_position_embeddings:
        raise GenerateError("sliding-window attention is not supported by lowbit's decoder")
    return _Arch(len(inner.layers), heads, kv, hd, int(cfg.max_position_embeddings), _rope_theta(cfg))


class Decoder:
    """One decoding run of ``model`` over at most ``length`` positions (batch 1).

    ``feed(ids)`` runs ``ids (T,)`` long at the next positions and returns the logits
    ``(vocab,)`` float32 of the last one. The cache, rotary tables and scratch are allocated here.
    Raises :class:`GenerateError` for a model it cannot run or a length beyond the context.
    """

    def __init__(self, model, length: int, kv_cache: str = "float32") -> None:
        if kv_cache not in ("float32", "int8"):
            raise GenerateError(f"kv_cache must be 'float32' or 'int8', not {kv_cache!r}")
        a = self.arch = _arch(model)
        if length > a.context:
            raise GenerateError(f"{length} positions exceed the model's context of {a.context}")
        self.model, self.length, self.pos, self.int8 = model, length, 0, kv_cache == "int8"
        head = model.lm_head
        dev = self.device = next(iter([*head.buffers(), *head.parameters()])).device  # where the model runs
        inner = model.model
        self.layers = [
            (_norm(b.input_layernorm), _group([b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]),
             _group([b.self_attn.o_proj]), _norm(b.post_attention_layernorm),
             _group([b.mlp.gate_proj, b.mlp.up_proj]), _group([b.mlp.down_proj]))
            for b in inner.layers
        ]  # fmt: skip
        self.final_norm = _norm(inner.norm)
        self.head = _group([model.lm_head])
        shape = (a.layers, a.kv_heads, length, a.head_dim)
        dtype = torch.int8 if self.int8 else torch.float32
        self.k, self.v = torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev)
        if self.int8:
            self.ks, self.vs = torch.zeros(shape[:3] + (1,), device=dev), torch.zeros(shape[:3] + (1,), device=dev)
        inv = 1.0 / (a.theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64).float() / a.head_dim))
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), -1)
        self.cos, self.sin = emb.cos().to(dev), emb.sin().to(dev)  # (length, head_dim)
        self.scale = a.head_dim**-0.5
        self.fast = self._fast_layers(inner)

    def _fast_layers(self, inner) -> list | None:
        """Per layer, a :class:`lowbit.kernels.cpu.DecodeLayer` (one C call per decode step) when
        every layer can have one, else None (the torch path runs)."""
        from .kernels.cpu import DecodeLayer

        if self.int8:
            return None
        out = []
        for i, blk in enumerate(inner.layers):
            a, m = blk.self_attn, blk.mlp
            mods = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": m.gate_proj, "up": m.up_proj,
                    "down": m.down_proj}  # fmt: skip
            n1, n2 = blk.input_layernorm, blk.post_attention_layernorm
            eps = getattr(n1, "variance_epsilon", None)
            if getattr(n2, "variance_epsilon", None) != eps or not type(n1).__name__.endswith("RMSNorm"):
                return None
            fl = DecodeLayer.of(mods, (getattr(n1, "weight", None), getattr(n2, "weight", None)), eps, self.arch,
                                self.k[i], self.v[i], self.cos, self.sin, self.scale)  # fmt: skip
            if fl is None:
                return None
            out.append(fl)
        return out

    def nbytes_cache(self) -> int:
        """Bytes of the key/value cache (and its scales for int8)."""
        n = self.k.numel() * self.k.element_size() * 2
        return n + (self.ks.numel() * 4 * 2 if self.int8 else 0)

    def _rope(self, x: torch.Tensor, p0: int, t: int) -> torch.Tensor:
        """``x (heads, T, hd)`` rotated for positions ``p0 .. p0+T-1``."""
        cos, sin = self.cos[p0 : p0 + t], self.sin[p0 : p0 + t]
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), -1)
        return x * cos + rot * sin

    def _store(self, i: int, p0: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v (kv_heads, T, hd)`` at positions ``p0 ..``; return the cache up to there
        (dequantized for int8)."""
        p1 = p0 + k.shape[1]
        if not self.int8:
            self.k[i, :, p0:p1] = k
            self.v[i, :, p0:p1] = v
            return self.k[i, :, :p1], self.v[i, :, :p1]
        for src, q, s in ((k, self.k, self.ks), (v, self.v, self.vs)):
            step = src.abs().amax(-1, keepdim=True) / 127.0
            s[i, :, p0:p1] = step
            q[i, :, p0:p1] = torch.round(src / torch.where(step == 0, 1.0, step)).clamp_(-127, 127).to(torch.int8)
        return self.k[i, :, :p1].float() * self.ks[i, :, :p1], self.v[i, :, :p1].float() * self.vs[i, :, :p1]

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids (T,)`` at the next positions; the last position's logits ``(vocab,)``, or
        with ``all_logits`` every position's ``(T, vocab)`` (for perplexity through the cache)."""
        a, t, p0 = self.arch, ids.numel(), self.pos
        if t == 0:
            raise GenerateError("nothing to feed (an empty prompt)")
        if p0 + t > self.length:
            raise GenerateError(f"position {p0 + t} is beyond the {self.length} this decoder was made for")
        x = self.model.model.embed_tokens(ids.reshape(1, t).to(self.device)).float()  # (1, T, hidden)
        if t == 1 and self.fast is not None and not all_logits:
            xv = x.reshape(-1).clone()
            if all(layer(xv, p0) for layer in self.fast):  # else NaN/inf: the float path below, from the start
                self.pos = p0 + 1
                return self.head(self.final_norm(xv.reshape(1, -1))).reshape(-1).clone()  # the group reuses its buffer
        groups = a.heads // a.kv_heads
        nq, nk = a.heads * a.head_dim, a.kv_heads * a.head_dim
        for i, (n1, qkv, op, n2, gate_up, dp) in enumerate(self.layers):
            y = qkv(n1(x)).reshape(t, nq + 2 * nk)
            qk = self._rope(y[:, : nq + nk].reshape(t, a.heads + a.kv_heads, a.head_dim).transpose(0, 1), p0, t)
            q, k = qk[: a.heads], qk[a.heads :]
            v = y[:, nq + nk :].reshape(t, a.kv_heads, a.head_dim).transpose(0, 1)
            kc, vc = self._store(i, p0, k, v)
            if t == 1:
                # grouped heads: the `groups` query heads of each key/value head as one batch
                qg = q.reshape(a.kv_heads, groups, a.head_dim)
                w = torch.softmax(torch.bmm(qg, kc.transpose(1, 2)) * self.scale, -1)  # (kv, groups, T)
                att = torch.bmm(w, vc).reshape(a.heads, 1, a.head_dim)
            else:
                att = F.scaled_dot_product_attention(
                    q.unsqueeze(0), kc.unsqueeze(0), vc.unsqueeze(0), is_causal=p0 == 0,
                    attn_mask=None if p0 == 0 else self._mask(p0, t), scale=self.scale, enable_gqa=True,
                )[0]  # fmt: skip
            x = x + op(att.transpose(0, 1).reshape(t, a.heads * a.head_dim)).reshape(1, t, -1)
            gu = gate_up(n2(x)).reshape(t, -1)
            inter = gu.shape[-1] // 2
            x = x + dp(F.silu(gu[:, :inter]) * gu[:, inter:]).reshape(1, t, -1)
        self.pos = p0 + t
        if all_logits:
            return self.model.lm_head(self.final_norm(x).reshape(t, -1)).reshape(t, -1).float()
        last = self.final_norm(x[:, -1:])
        return self.head(last.reshape(1, -1)).reshape(-1).clone()

    def _mask(self, p0: int, t: int) -> torch.Tensor:
        """Causal mask for ``t`` new positions after ``p0`` cached ones: ``(t, p0 + t)`` bool."""
        return torch.ones(t, p0 + t, dtype=torch.bool, device=self.device).tril(p0)


def _group(mods: list) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projections of one input, outputs side by side: one C call when all run lowbit's packed
    CPU kernel (:class:`lowbit.kernels.cpu.LinearGroup`), else each module in turn."""
    from .kernels.cpu import LinearGroup

    group = LinearGroup.of(mods)
    if group is not None:
        return group
    mods = [_in_own_dtype(m) for m in mods]
    if len(mods) == 1:
        return mods[0]
    return lambda h: torch.cat([m(h) for m in mods], -1)


def _in_own_dtype(mod) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod``, or for a float layer stored in half precision (a model cast to fp16/bf16) a call
    that hands it the decoder's float32 activations in its dtype and returns float32."""
    w = getattr(mod, "weight", None) if isinstance(mod, nn.Linear) else None
    if isinstance(w, torch.Tensor) and w.dtype != torch.float32:
        return lambda h: mod(h.to(w.dtype)).float()
    return mod


def _norm(mod) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' Llama-family RMSNorm (``weight * x / sqrt(mean(x^2) + eps)``, float32)
    without the module call's overhead, else the module itself."""
    w, eps = getattr(mod, "weight", None), getattr(mod, "variance_epsilon", None)
    if type(mod).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and eps is not None:
        wf = w.detach().float()

        def norm(x: torch.Tensor) -> torch.Tensor:  # the module's own arithmetic, in fewer calls
            xf = x.float()
            return wf * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))

        return norm
    return mod


def _ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise GenerateError(f"lowbit.generate decodes one sequence (batch 1), got a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise GenerateError(f"input_ids must be a 1-D (or (1, T)) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() == 0:
        raise GenerateError("empty prompt: give at least one token")
    return ids.long()


def stream(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    eos_token_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    kv_cache: str = "float32",
) -> Iterator[int]:
    """Yield the new tokens of a batch-1 decode one at a time (see :func:`generate`)."""
    ids = _ids(input_ids)
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (isinstance(temperature, (int, float)) and temperature == temperature and 0 <= temperature < float("inf")):
        raise GenerateError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise GenerateError(f"top_k must be a positive integer or None, got {top_k!r}")
    arch = _arch(model)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise GenerateError(f"token ids must lie in 0 .. {vocab - 1} (the vocabulary), got {int(ids.min())} .. {int(ids.max())}")
    if ids.numel() >= arch.context:
        raise GenerateError(f"the prompt has {ids.numel()} tokens; the model's context is {arch.context}")
    if ids.numel() + max_new_tokens > arch.context:
        raise GenerateError(
            f"prompt ({ids.numel()}) + max_new_tokens ({max_new_tokens}) exceed the model's context of {arch.context}"
        )
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_token_id = eos_token_id if eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dec = Decoder(model, ids.numel() + max_new_tokens, kv_cache)
    logits = dec.feed(ids)
    for n in range(max_new_tokens):
        tok = _pick(logits, temperature, top_k, gen)
        yield tok
        if tok in stops or n + 1 == max_new_tokens:
            return
        logits = dec.feed(torch.tensor([tok]))


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.float().cpu() / temperature  # sampled on the CPU, with the CPU generator
    if top_k:
        kth = torch.topk(z, min(top_k, z.numel())).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen))


def generate(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    eos_token_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    kv_cache: str = "float32",
    on_token: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` after ``input_ids`` (``(T,)`` or ``(1, T)`` long) with a
    Llama-family ``model`` (quantized or not); returns ``(1, T + new)`` long, prompt included, like
    transformers' ``generate``.

    Greedy by default (``temperature=0``); else samples from ``softmax(logits / temperature)``,
    within the ``top_k`` most likely when given, with ``seed``. Stops after an end-of-sequence
    token (``eos_token_id``, default the model's). ``on_token(id)`` is called as each token is
    chosen (streaming). ``kv_cache="int8"`` stores keys and values as int8 (see the module doc).

    Raises :class:`GenerateError`: not a Llama-family decoder, batch > 1, an empty prompt, or a
    prompt (plus ``max_new_tokens``) longer than the model's context.
    """
    ids = _ids(input_ids)
    out = []
    for tok in stream(model, ids, max_new_tokens, eos_token_id=eos_token_id, temperature=temperature, top_k=top_k,
                      seed=seed, kv_cache=kv_cache):  # fmt: skip
        out.append(tok)
        if on_token is not None:
            on_token(tok)
    return torch.cat((ids, torch.tensor(out, dtype=torch.long))).unsqueeze(0)
