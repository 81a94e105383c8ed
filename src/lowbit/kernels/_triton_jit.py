"""Triton kernels over lowbit's packed row layout (the math; :mod:`lowbit.kernels.triton` launches them).

Imported by :func:`lowbit.kernels.triton._jit` at first use (so that importing lowbit never
imports Triton).

The weight is the stored row layout (:mod:`lowbit.packing`): row ``n`` of ``(N, row_bytes)``
uint8 holds units of ``NB`` bytes, each little-endian unit holding ``PER`` codes of ``BITS``
bits (int2: 1 byte / 4 codes, int4: 1 / 2, int8 and fp8: 1 / 1, int3: 3 / 8); column ``k`` is
sub-code ``k % PER`` of unit ``k // PER``. A kernel reads a block of units once and multiplies
each of its ``PER`` code planes by the matching strided columns of ``x``, so every byte of the
weight is loaded once per output tile.

Values (``KIND``): 0 affine, ``(code - zero) * scale`` with the zero point implicit (``SYM_ZERO``)
or one per group (``z``: uint8 codes or float16 fractional ones, ``(R, ng)``); 1 table,
``lut[code] * scale`` (NF4 levels; FP8 E4M3 as a 256-entry table of its bytes' values). Scales
are ``(R, ng)`` with ``R`` = N or 1 (per-tensor, stride 0). ``ONE_GROUP``: every K block lies
inside one group (the group size is a multiple of the block, or one group per row), so the
block's sums are scaled once per row; otherwise each element's group is looked up.
"""

import triton
import triton.language as tl


@triton.jit
def _unit_words(q_ptr, offs_n, offs_u, mask, row_bytes, NB: tl.constexpr):
    """``(BLOCK_N, BLOCK_U)`` int32: the little-endian units ``offs_u`` of rows ``offs_n``."""
    base = q_ptr + offs_n[:, None].to(tl.int64) * row_bytes + offs_u[None, :] * NB
    w = tl.load(base, mask=mask, other=0).to(tl.int32)
    if NB == 3:
        w = w | (tl.load(base + 1, mask=mask, other=0).to(tl.int32) << 8)
        w = w | (tl.load(base + 2, mask=mask, other=0).to(tl.int32) << 16)
    return w


@triton.jit
def _values(words, i, offs_n, nmask, k, kmask, s_ptr, s_stride, z_ptr, z_stride, lut_ptr, G, g0,
            KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, BITS: tl.constexpr,
            ONE_GROUP: tl.constexpr):
    """The weight values of code plane ``i`` (columns ``k``) of the unit words, float32
    ``(BLOCK_N, BLOCK_U)``; with ``ONE_GROUP`` not yet times the (shared) scale."""
    c = (words >> (i * BITS)) & ((1 << BITS) - 1)
    if ONE_GROUP:
        if KIND == 1:
            v = tl.load(lut_ptr + c)
        elif HAS_ZERO:
            z = tl.load(z_ptr + offs_n * z_stride + g0, mask=nmask, other=0).to(tl.float32)
            v = c.to(tl.float32) - z[:, None]
        else:
            v = c.to(tl.float32) - SYM_ZERO
    else:
        g = k // G
        m2 = nmask[:, None] & kmask[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * s_stride + g[None, :], mask=m2, other=0).to(tl.float32)
        if KIND == 1:
            v = tl.load(lut_ptr + c) * s
        elif HAS_ZERO:
            z = tl.load(z_ptr + offs_n[:, None] * z_stride + g[None, :], mask=m2, other=0).to(tl.float32)
            v = (c.to(tl.float32) - z) * s
        else:
            v = (c.to(tl.float32) - SYM_ZERO) * s
    return v


@triton.jit
def gemv(x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
         N, K, row_bytes, G, x_stride, y_stride, s_stride, z_stride,
         KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, BITS: tl.constexpr,
         NB: tl.constexpr, PER: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr):
    """``y[m, n] = sum_k x[m, k] * W[n, k]`` for one input row ``m`` (grid axis 1) and
    ``BLOCK_N`` output channels (axis 0); float32 sums, ``y`` in its own dtype. Decode (GEMV):
    no tensor cores, each weight byte read once per input row; ``HAS_BIAS``: plus float32 ``b[n]``."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    units = (K + PER - 1) // PER
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for u0 in range(0, units, BLOCK_U):
        offs_u = u0 + tl.arange(0, BLOCK_U)
        words = _unit_words(q_ptr, offs_n, offs_u, nmask[:, None] & (offs_u < units)[None, :], row_bytes, NB)
        g0 = (u0 * PER) // G
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in tl.static_range(PER):
            k = offs_u * PER + i
            kmask = k < K
            xv = tl.load(x_ptr + m * x_stride + k, mask=kmask, other=0).to(tl.float32)
            v = _values(words, i, offs_n, nmask, k, kmask, s_ptr, s_stride, z_ptr, z_stride, lut_ptr, G, g0,
                        KIND, HAS_ZERO, SYM_ZERO, BITS, ONE_GROUP)
            part += tl.sum(v * xv[None, :], axis=1)
        if ONE_GROUP:
            s = tl.load(s_ptr + offs_n * s_stride + g0, mask=nmask, other=0).to(tl.float32)
            part = part * s
        acc += part
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nmask, other=0).to(tl.float32)
    tl.store(y_ptr + m * y_stride + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def gemm(x_ptr, q_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, y_ptr,
         M, N, K, row_bytes, G, x_stride, y_stride, s_stride, z_stride,
         KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr, BITS: tl.constexpr,
         NB: tl.constexpr, PER: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, GROUP_M: tl.constexpr):
    """``y = x @ W^T`` for a ``BLOCK_M x BLOCK_N`` tile (prefill): each code plane is decoded in
    registers to ``x``'s dtype and multiplied on the tensor cores (``tl.dot``, float32 sums;
    ``IEEE``: tiles widened to float32 and multiplied in full float32, not TF32, for float32
    inputs and for fp16 ones whose scaled values could leave fp16's range). With ``ONE_GROUP`` the
    plane holds ``code - zero`` (exact in fp16/bf16 for integer zero points) and the tile's sums
    are scaled once per K block. Tiles are visited ``GROUP_M`` row blocks at a time so that
    consecutive programs share weight columns in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    units = (K + PER - 1) // PER
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for u0 in range(0, units, BLOCK_U):
        offs_u = u0 + tl.arange(0, BLOCK_U)
        words = _unit_words(q_ptr, offs_n, offs_u, nmask[:, None] & (offs_u < units)[None, :], row_bytes, NB)
        g0 = (u0 * PER) // G
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(PER):
            k = offs_u * PER + i
            kmask = k < K
            a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * x_stride + k[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0)
            if IEEE:
                a = a.to(tl.float32)
            v = _values(words, i, offs_n, nmask, k, kmask, s_ptr, s_stride, z_ptr, z_stride, lut_ptr, G, g0,
                        KIND, HAS_ZERO, SYM_ZERO, BITS, ONE_GROUP)
            if IEEE:
                part = tl.dot(a, tl.trans(v.to(a.dtype)), part, input_precision="ieee")
            else:
                part = tl.dot(a, tl.trans(v.to(a.dtype)), part)
        if ONE_GROUP:
            s = tl.load(s_ptr + offs_n * s_stride + g0, mask=nmask, other=0).to(tl.float32)
            part = part * s[None, :]
        acc += part
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m[:, None].to(tl.int64) * y_stride + offs_n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
