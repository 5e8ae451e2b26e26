"""Full (non-causal) self-attention over sparse tokens with the query's QK-RMSNorm and 3D RoPE fused
into the kernel's prologue (DESIGN.md §6), in Triton.

FlashAttention-2 style forward: one program per (block of BLOCK_M queries, batch item, head), online
softmax in the log2 domain, bf16 (or fp32) tensor-core products with fp32 accumulation. The query
tile is read raw from the fused qkv projection, RMS-normalised (x gamma x sqrt(D)), rounded, rotated
by RoPE and rounded again, exactly as the eager blocks do before attention; keys are normalised once
by `kernels.flow_kernels.qk_prologue` (normalising them per query block would repeat that work
N / BLOCK_M times) and values are read in place from the qkv projection.

The reference is `torch.nn.functional.scaled_dot_product_attention` on prologue-processed inputs;
whether this kernel or an SDPA backend runs in the fast path is decided by `pixal3d-rt bench --section flows`
on the GPU (benchmarks/flows.md).
"""
from __future__ import annotations

import math

import torch

from .flow_kernels import norm_rope_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

if triton is not None:
    from .flow_kernels import norm_rope_tile

LOG2E = 1.4426950408889634
DEFAULT_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, COS, SIN, GQ,
                         sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
                         N, H, n_pos, qk_scale, g_scale, eps,
                         HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PROLOGUE: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        dt = K.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < N
        q_base = Q + b * sqb + h * sqh
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_D
        if PROLOGUE:  # the same tile math as the keys' prologue kernel
            HALF: tl.constexpr = BLOCK_D // 2
            j = tl.arange(0, HALF)
            x = tl.load(q_base + offs_m[:, None] * sqn + d[None, :], mask=mmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            g = tl.load(GQ + h * HEAD_D + d, mask=dmask, other=0.0)
            pos = offs_m % n_pos
            tmask = mmask[:, None] & (j < HEAD_D // 2)[None, :]
            c = tl.load(COS + pos[:, None] * (HEAD_D // 2) + j[None, :], mask=tmask, other=1.0)
            s = tl.load(SIN + pos[:, None] * (HEAD_D // 2) + j[None, :], mask=tmask, other=0.0)
            q = norm_rope_tile(x, g, c, s, g_scale, eps, K, BLOCK_M, HALF)
        else:
            q = tl.load(q_base + offs_m[:, None] * sqn + d[None, :], mask=mmask[:, None] & dmask[None, :],
                        other=0.0).to(dt)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        n_full = (N // BLOCK_N) * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[None, :] * skn + d[:, None], mask=dmask[:, None], other=0.0)
            sc = tl.dot(q, k) * qk_scale
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * svn + d[None, :], mask=dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
            m_i = m_new
        if n_full < N:  # the partial last key block
            offs_n = n_full + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            k = tl.load(k_base + offs_n[None, :] * skn + d[:, None], mask=dmask[:, None] & nmask[None, :], other=0.0)
            sc = tl.dot(q, k) * qk_scale
            sc = tl.where(nmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * svn + d[None, :], mask=dmask[None, :] & nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
        out = acc / l_i[:, None]
        o_ptr = O + b * sob + h * soh + offs_m[:, None] * son + d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, prologue=None, out: torch.Tensor | None = None,
              config: dict | None = None) -> torch.Tensor:
    """q, k, v: [B, N, H, D] (token-major views, last dim contiguous; q may be the raw q columns of a
    fused qkv projection when `prologue` is given). prologue = (cos [P, D/2] fp32, sin, gamma_q [H, D]
    fp32, n_pos): apply the query's RMSNorm and RoPE (row n at position n % n_pos) in the kernel.
    Returns out [B, N, H, D] contiguous (token-major), softmax scale 1/sqrt(D)."""
    if triton is None:
        raise RuntimeError("attention_triton needs triton")
    B, N, H, D = q.shape
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    for t in (q, k, v):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    if out is None:
        out = torch.empty(B, N, H, D, dtype=k.dtype, device=k.device)
    if prologue is not None:
        cos, sin, gq, n_pos = prologue
        assert D % 2 == 0
    else:
        cos = sin = gq = k
        n_pos = 1
    if B * N == 0:
        return out
    grid = (triton.cdiv(N, cfg["block_m"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, cos, sin, gq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        N, H, n_pos, LOG2E / math.sqrt(D), float(D ** 0.5), 1e-12,
        HEAD_D=D, BLOCK_D=max(16, _pow2(D)), BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        PROLOGUE=prologue is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def attention_ref(q, k, v, *, prologue=None):
    """Pure-torch oracle of `attention` (prologue through kernels.flow_kernels' reference)."""
    B, N, H, D = q.shape
    if prologue is not None:
        cos, sin, gq, n_pos = prologue
        q = norm_rope_ref(q.reshape(B * N, H, D), gq, cos, sin, n_pos, k.dtype).reshape(B, N, H, D)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
