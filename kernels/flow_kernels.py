"""Fused row-wise kernels of the flow transformers' fast path (DESIGN.md §6).

Each operation has a pure-torch reference (the CPU path and the oracle) and a Triton kernel used on
CUDA; `PIXAL3D_NO_TRITON=1` turns the Triton kernels off. Both round exactly where the eager bf16
blocks round (`models/flow_layers.py`): the LayerNorm output, `norm * (1 + scale)`, `+ shift`,
`y * gate` and the residual sum are each rounded to the torso dtype, statistics run in fp32. So the
fused path differs from eager only by summation order.

* `residual_norm`  x <- x + [y or vec] (* gate), then an optional LayerNorm of the new x:
                   modulated (`ln(x) * (1 + scale) + shift`, no affine) or affine (fp32 weight/bias).
* `qk_prologue`    per-head QK-RMSNorm and 3D RoPE of the q and k columns of the fused qkv
                   projection, written token-major for attention (v optionally copied alongside).
* `cross_probs`    the softmax weights of cross-attention to a handful of context tokens (M = 5 in
                   Pixal3D), with the query's RMSNorm fused in; the value side is folded into a GEMM.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the references cover every operation
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

NORM_NONE, NORM_MOD, NORM_AFFINE = 0, 1, 2
RMS_EPS = 1e-12  # F.normalize's eps


def triton_enabled(device: torch.device | str) -> bool:
    """Triton kernels on CUDA tensors (or anywhere in interpreter mode), unless switched off."""
    if triton is None or os.environ.get("PIXAL3D_NO_TRITON", "0") == "1":
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# references


def residual_norm_ref(x, *, y=None, vec=None, gate=None, norm=NORM_NONE, na=None, nb=None, eps=1e-6,
                      out_x=None, out_dup=None, h_out=None):
    """x [R, C] (torso dtype). Adds `y [R, C]` or `vec [C]` (times `gate [C]`) and writes the new x to
    `out_x` (and to `out_dup`, a second [R, C] destination); then, with `norm`, writes the LayerNorm
    of the new x to `h_out [R, C]`: NORM_MOD: na = 1 + scale, nb = shift (torso dtype);
    NORM_AFFINE: na = weight, nb = bias (fp32). Returns (new x, h or None)."""
    dt = x.dtype
    if y is not None or vec is not None:
        t = y if y is not None else vec.expand_as(x)
        if gate is not None:
            t = t * gate
        x = x + t
        if out_x is not None:
            out_x.copy_(x)
        if out_dup is not None:
            out_dup.copy_(x)
    h = None
    if norm != NORM_NONE:
        ln = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
        if norm == NORM_MOD:
            h = ln.to(dt) * na + nb
        else:
            h = (ln * na + nb).to(dt)
        if h_out is not None:
            h_out.copy_(h)
    return x, h


def norm_rope_ref(z, g, cos, sin, n_pos, dtype):
    """z [R, H, D] raw q or k -> RMSNorm (fp32, x gamma x sqrt(D), rounded to dtype), then RoPE (fp32,
    rounded) of the channel pairs (2j, 2j+1); row r sits at position r % n_pos of cos/sin [n_pos, D/2]."""
    R, H, D = z.shape
    pos = torch.arange(R, device=z.device) % n_pos
    c, s = cos[pos][:, None], sin[pos][:, None]  # [R, 1, D/2]
    z = (torch.nn.functional.normalize(z.float(), dim=-1) * g * D ** 0.5).to(dtype).float()
    e, o = z[..., 0::2], z[..., 1::2]
    return torch.stack([e * c - o * s, e * s + o * c], dim=-1).reshape(R, H, D).to(dtype)


def qk_prologue_ref(qkv, cos, sin, gq, gk, heads, n_pos, *, do_q=True, do_v=True):
    """qkv [R, 3C] -> (q, k, v) [R, C] each: `norm_rope_ref` of the q and k columns, v copied."""
    R, C3 = qkv.shape
    C = C3 // 3
    D = C // heads

    def norm_rope(z, g):
        return norm_rope_ref(z.reshape(R, heads, D), g, cos, sin, n_pos, qkv.dtype).reshape(R, C)

    q = norm_rope(qkv[:, :C], gq) if do_q else None
    k = norm_rope(qkv[:, C:2 * C], gk)
    v = qkv[:, 2 * C:].contiguous() if do_v else None
    return q, k, v


def cross_probs_ref(qc, kc, gq, heads, m_ctx, width):
    """qc [R, C] raw cross queries, kc [H, M, D] normalised keys -> p [R, width] (torso dtype):
    p[r, h*M + j] = softmax_j(rmsnorm(q_rh) . k_hj / sqrt(D)); columns past H*M are zero."""
    R, C = qc.shape
    D = C // heads
    dt = qc.dtype
    q = qc.reshape(R, heads, D).float()
    q = (torch.nn.functional.normalize(q, dim=-1) * gq * D ** 0.5).to(dt).float()
    s = torch.einsum("rhd,hjd->rhj", q, kc.float()) / D ** 0.5
    p = torch.softmax(s, dim=-1).reshape(R, heads * m_ctx)
    out = torch.zeros(R, width, dtype=dt, device=qc.device)
    out[:, : heads * m_ctx] = p.to(dt)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    # row counts change with every image: not specialised (Triton would compile a second variant for
    # counts divisible by 16, a compile in the middle of an image)
    @triton.jit(do_not_specialize=["n_rows", "dup_offset"])
    def _residual_norm_kernel(X, XO, Y, VEC, G, NA, NB, H, n_rows, C, stride_x, stride_xo, stride_y, stride_h,
                              dup_offset, eps,
                              HAS_Y: tl.constexpr, HAS_VEC: tl.constexpr, HAS_GATE: tl.constexpr,
                              NORM: tl.constexpr, DUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        dt = X.dtype.element_ty
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_Y or HAS_VEC:
            if HAS_Y:
                t = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                t = tl.load(VEC + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_GATE:
                g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
                t = (t * g[None, :]).to(dt).to(tl.float32)
            x = (x.to(tl.float32) + t).to(dt)
            tl.store(XO + rows[:, None] * stride_xo + cols[None, :], x, mask=mask)
            if DUP:
                tl.store(XO + (rows[:, None] + dup_offset) * stride_xo + cols[None, :], x, mask=mask)
        if NORM != 0:
            xf = x.to(tl.float32)
            mean = tl.sum(xf, axis=1) / C
            d = tl.where(mask, xf - mean[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / C
            ln = d * (1.0 / tl.sqrt(var + eps))[:, None]
            a = tl.load(NA + cols, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(NB + cols, mask=cmask, other=0.0).to(tl.float32)
            if NORM == 1:  # eager: norm(x) rounded, * (1 + scale) rounded, + shift rounded
                hv = (ln.to(dt).to(tl.float32) * a[None, :]).to(dt).to(tl.float32)
                hv = (hv + b[None, :]).to(dt)
            else:  # affine LayerNorm in fp32, rounded once
                hv = (ln * a[None, :] + b[None, :]).to(dt)
            tl.store(H + rows[:, None] * stride_h + cols[None, :], hv, mask=mask)

    @triton.jit
    def norm_rope_tile(x, g, c, s, g_scale, eps, DST, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """QK-RMSNorm (x gamma x sqrt(D), rounded to DST's dtype) then RoPE (rounded) of one head's
        tile x [ROWS, 2*BLOCK_HALF] (fp32, raw, zero past D); g [2*BLOCK_HALF] its gamma; c, s
        [ROWS, BLOCK_HALF] the rotation of each channel pair (2j, 2j+1). The tile is loaded and
        stored contiguously; the pairs are taken apart in registers (reshape + split), not by
        stride-2 memory accesses."""
        dt = DST.dtype.element_ty
        den = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
        z = ((x / den[:, None]) * g[None, :] * g_scale).to(dt).to(tl.float32)
        e, o = tl.split(tl.reshape(z, (ROWS, BLOCK_HALF, 2)))
        re = (e * c - o * s).to(dt)
        ro = (e * s + o * c).to(dt)
        return tl.reshape(tl.join(re, ro), (ROWS, 2 * BLOCK_HALF))

    @triton.jit(do_not_specialize=["n_rows", "n_pos"])
    def _qk_prologue_kernel(QKV, Q, K, V, COS, SIN, GQ, GK, n_rows, n_pos, C, stride_in, stride_out, stride_tab,
                            g_scale, eps, DO_Q: tl.constexpr, DO_V: tl.constexpr, HEAD_D: tl.constexpr,
                            BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, 2 * BLOCK_HALF)
        j = tl.arange(0, BLOCK_HALF)
        rmask = rows < n_rows
        dmask = d < HEAD_D
        mask = rmask[:, None] & dmask[None, :]
        tmask = rmask[:, None] & (j < HEAD_D // 2)[None, :]
        pos = rows % n_pos
        c = tl.load(COS + pos[:, None] * stride_tab + j[None, :], mask=tmask, other=1.0)
        s = tl.load(SIN + pos[:, None] * stride_tab + j[None, :], mask=tmask, other=0.0)
        src = QKV + rows[:, None] * stride_in + h * HEAD_D + d[None, :]
        dst = rows[:, None] * stride_out + h * HEAD_D + d[None, :]
        if DO_Q:
            x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(GQ + h * HEAD_D + d, mask=dmask, other=0.0)
            tl.store(Q + dst, norm_rope_tile(x, g, c, s, g_scale, eps, Q, ROWS, BLOCK_HALF), mask=mask)
        x = tl.load(src + C, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GK + h * HEAD_D + d, mask=dmask, other=0.0)
        tl.store(K + dst, norm_rope_tile(x, g, c, s, g_scale, eps, K, ROWS, BLOCK_HALF), mask=mask)
        if DO_V:
            tl.store(V + dst, tl.load(src + 2 * C, mask=mask, other=0.0), mask=mask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _cross_probs_kernel(QC, KC, G, P, n_rows, stride_q, stride_p, g_scale, sm_scale, eps,
                            M: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                            ROWS: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, BLOCK_D)
        jj = tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        dmask = d < HEAD_D
        dt = QC.dtype.element_ty
        q = tl.load(QC + rows[:, None] * stride_q + h * HEAD_D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        g = tl.load(G + h * HEAD_D + d, mask=dmask, other=0.0)
        den = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), eps)
        q = ((q / den[:, None]) * g[None, :] * g_scale).to(dt).to(tl.float32)
        # one row reduction per context token (M is a handful): no [ROWS, M, D] broadcast in registers
        sc = tl.full((ROWS, BLOCK_M), float("-inf"), tl.float32)
        for m in tl.static_range(M):
            km = tl.load(KC + (h * M + m) * HEAD_D + d, mask=dmask, other=0.0).to(tl.float32)
            sm = tl.sum(q * km[None, :], axis=1) * sm_scale
            sc = tl.where((jj == m)[None, :], sm[:, None], sc)
        mx = tl.max(sc, axis=1)
        e = tl.exp(sc - mx[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        tl.store(P + rows[:, None] * stride_p + h * M + jj[None, :], p.to(P.dtype.element_ty),
                 mask=rmask[:, None] & (jj < M)[None, :])


# ---------------------------------------------------------------------------------------------
# dispatch


def residual_norm(x, *, y=None, vec=None, gate=None, norm=NORM_NONE, na=None, nb=None, eps=1e-6,
                  out_x=None, out_dup=None, h_out=None, use_triton=None):
    """See `residual_norm_ref`. With `out_x` given the new x is written there (it may be x itself);
    `out_dup` (same row stride as out_x, in the same allocation) receives a copy; with `h_out` given
    the norm goes there. Returns (new x, h)."""
    R, C = x.shape
    if use_triton is None:
        use_triton = triton_enabled(x.device)
    if not use_triton:
        return residual_norm_ref(x, y=y, vec=vec, gate=gate, norm=norm, na=na, nb=nb, eps=eps,
                                 out_x=out_x, out_dup=out_dup, h_out=h_out)
    adds = y is not None or vec is not None
    if adds and out_x is None:
        out_x = torch.empty_like(x)
    if norm != NORM_NONE and h_out is None:
        h_out = torch.empty_like(x)
    for t in (x, y, out_x, out_dup, h_out):
        assert t is None or t.stride(-1) == 1
    dup_offset = 0
    if out_dup is not None:  # the kernel writes the copy at a fixed row offset from out_x
        step = out_x.stride(0) * out_x.element_size()
        delta = out_dup.data_ptr() - out_x.data_ptr()
        assert out_dup.stride(0) == out_x.stride(0) and delta > 0 and delta % step == 0
        dup_offset = delta // step
    if R:
        rows = 4 if C <= 2048 else 2
        dummy = x
        _residual_norm_kernel[(triton.cdiv(R, rows),)](
            x, out_x if adds else dummy, y if y is not None else dummy, vec if vec is not None else dummy,
            gate if gate is not None else dummy, na if na is not None else dummy, nb if nb is not None else dummy,
            h_out if h_out is not None else dummy,
            R, C, x.stride(0), (out_x if adds else x).stride(0), (y if y is not None else x).stride(0),
            (h_out if h_out is not None else x).stride(0), dup_offset, eps,
            HAS_Y=y is not None, HAS_VEC=y is None and vec is not None, HAS_GATE=gate is not None, NORM=norm,
            DUP=dup_offset > 0, ROWS=rows, BLOCK_C=_pow2(C), num_warps=8 if C > 1024 else 4)
    return (out_x if adds else x), h_out


def qk_prologue(qkv, cos, sin, gq, gk, heads, n_pos, *, do_q=True, do_v=True, out=None, use_triton=None):
    """See `qk_prologue_ref`; `out` = optional (q, k, v) buffers [R, C]."""
    if use_triton is None:
        use_triton = triton_enabled(qkv.device)
    if not use_triton:
        q, k, v = qk_prologue_ref(qkv, cos, sin, gq, gk, heads, n_pos, do_q=do_q, do_v=do_v)
        if out is not None:
            for dst, src in zip(out, (q, k, v)):
                if dst is not None and src is not None:
                    dst.copy_(src)
            return tuple(d if s is not None else None for d, s in zip(out, (q, k, v)))
        return q, k, v
    R, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    assert qkv.stride(1) == 1 and D % 2 == 0
    q, k, v = out if out is not None else (None, None, None)
    q = (q if q is not None else qkv.new_empty(R, C)) if do_q else None
    k = k if k is not None else qkv.new_empty(R, C)
    v = (v if v is not None else qkv.new_empty(R, C)) if do_v else None
    if R:
        assert cos.stride(1) == 1 and sin.stride() == cos.stride()
        rows = 32
        _qk_prologue_kernel[(triton.cdiv(R, rows), heads)](
            qkv, q if do_q else k, k, v if do_v else k, cos, sin, gq, gk, R, n_pos, C, qkv.stride(0), k.stride(0),
            cos.stride(0), float(D ** 0.5), RMS_EPS, DO_Q=do_q, DO_V=do_v, HEAD_D=D, BLOCK_HALF=_pow2(D // 2),
            ROWS=rows, num_warps=4)
    return q, k, v


def cross_probs(qc, kc, gq, heads, m_ctx, width, *, out=None, use_triton=None):
    """See `cross_probs_ref`; `out` [R, width] must have its columns past H*M zeroed by the caller."""
    if use_triton is None:
        use_triton = triton_enabled(qc.device)
    if not use_triton:
        p = cross_probs_ref(qc, kc, gq, heads, m_ctx, width)
        if out is not None:
            out.copy_(p)
            return out
        return p
    R, C = qc.shape
    D = C // heads
    assert qc.stride(1) == 1 and kc.is_contiguous()
    if out is None:
        out = torch.zeros(R, width, dtype=qc.dtype, device=qc.device)
    if R:
        rows = 64
        _cross_probs_kernel[(triton.cdiv(R, rows), heads)](
            qc, kc, gq, out, R, qc.stride(0), out.stride(0), float(D ** 0.5), float(D ** -0.5), RMS_EPS,
            M=m_ctx, BLOCK_M=max(2, _pow2(m_ctx)), HEAD_D=D, BLOCK_D=_pow2(D), ROWS=rows, num_warps=4)
    return out
