"""2-D neighbourhood attention on the GPU (Triton), natten-free: the CUDA path of `na2d.na2d_at`.

One kernel serves both uses NAF has:

* full map (`rows is None`): every pixel of the X×Y query map, in raster order; the query tensor
  may be any strided view (NAF passes its [B, C, T, T] encoder map without a copy);
* sparse path: only the pixels (rows[m], cols[m]), e.g. the texels the bilinear taps of the
  projected voxels touch, so the T×T output is never built.

Keys and values are read through per-axis neighbour tables: win_x[x, a] is the k/v row of the a-th
neighbour of full-map row x (NATTEN's window, clamped inside the dilation group, composed with the
optional nearest-exact index map), so NAF's ×d upsampled K/V never exist either.

Per program: BLOCK_M queries of one (batch, head) and one BLOCK_DV slice of the value channels.
Two passes over the kx·ky neighbours (the first finds the row maximum of the logits, the second
accumulates exp2(s − max)·v), all in fp32 whatever the storage dtype; the logit scale Dqk^-0.5 is
folded into q together with log2(e).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from pixal3d_rt.kernels.na2d import _pair, neighbour_window

DISABLE_ENV = "PIXAL3D_DISABLE_TRITON_NA2D"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DQK = 256
# tile: queries per program, value channels per program, warps (H200 sweep, T = 512: 16/256/4 and
# 32/256/4 at 11.4-11.9 ms, 32/128/4 at 14.6 ms, 64/128/8 at 19.2 ms; benchmarks/results/conditioning_h200.json)
BLOCK_M = 16
BLOCK_DV = 256
NUM_WARPS = 4


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0") in ("", "0")


@triton.jit
def _na2d_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, cols_ptr, winx_ptr, winy_ptr,
    M, Y, H, KX, KY, DQK, DV, qk_scale,
    sq_b, sq_m, sq_h, sq_d,
    sk_b, sk_x, sk_y, sk_h, sk_d,
    sv_b, sv_x, sv_y, sv_h, sv_d,
    so_b, so_m, so_h,
    FULL_MAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < M
    if FULL_MAP:
        r = tl.where(mm, rm // Y, 0)
        c = tl.where(mm, rm % Y, 0)
    else:
        r = tl.load(rows_ptr + rm, mask=mm, other=0)
        c = tl.load(cols_ptr + rm, mask=mm, other=0)
    dq = tl.arange(0, BLOCK_DQK)
    dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mdq = dq < DQK
    mdv = dv < DV
    rm64 = rm.to(tl.int64)

    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rm64[:, None] * sq_m + dq[None, :] * sq_d,
        mask=mm[:, None] & mdq[None, :], other=0.0,
    ).to(tl.float32)
    q = q * qk_scale
    k_base = k_ptr + b * sk_b + h * sk_h + dq[None, :] * sk_d
    v_base = v_ptr + b * sv_b + h * sv_h + dv[None, :] * sv_d
    winx_row = winx_ptr + r.to(tl.int64) * KX
    winy_row = winy_ptr + c.to(tl.int64) * KY

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for a in range(KX):
        kr = tl.load(winx_row + a).to(tl.int64)
        for e in range(KY):
            kc = tl.load(winy_row + e).to(tl.int64)
            kt = tl.load(k_base + (kr * sk_x + kc * sk_y)[:, None], mask=mdq[None, :], other=0.0).to(tl.float32)
            m_i = tl.maximum(m_i, tl.sum(q * kt, axis=1))

    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for a in range(KX):
        kr = tl.load(winx_row + a).to(tl.int64)
        for e in range(KY):
            kc = tl.load(winy_row + e).to(tl.int64)
            kt = tl.load(k_base + (kr * sk_x + kc * sk_y)[:, None], mask=mdq[None, :], other=0.0).to(tl.float32)
            p = tl.exp2(tl.sum(q * kt, axis=1) - m_i)
            l_i += p
            vt = tl.load(v_base + (kr * sv_x + kc * sv_y)[:, None], mask=mdv[None, :], other=0.0).to(tl.float32)
            acc += p[:, None] * vt
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * so_b + h * so_h + rm64[:, None] * so_m + dv[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=mm[:, None] & mdv[None, :],
    )


def supported(q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Device/dtype/shape guard (the caller falls back to the torch reference)."""
    if not (enabled() and q_sel.is_cuda and k.device == q_sel.device and v.device == q_sel.device):
        return False
    if any(t.dtype not in _SUPPORTED_DTYPES for t in (q_sel, k, v)):
        return False
    return q_sel.dim() == 4 and k.dim() == 5 and v.dim() == 5 and q_sel.shape[-1] <= MAX_DQK


def na2d_at_triton(
    q_sel: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    kernel_size,
    dilation,
    *,
    kv_index: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_m: int | None = None,
    block_dv: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """`na2d.na2d_at` on the GPU; same arguments and result ([B, M, H, Dv] in v's dtype).
    rows = cols = None: every pixel of the X×Y map in raster order (M = X·Y).
    block_m / block_dv / num_warps override the module's tile (BLOCK_M, BLOCK_DV, NUM_WARPS)."""
    block_m = block_m or BLOCK_M
    block_dv = block_dv or BLOCK_DV
    num_warps = num_warps or NUM_WARPS
    kx, ky = _pair(kernel_size)
    dx, dy = _pair(dilation)
    B, M, H, Dqk = q_sel.shape
    Dv = v.shape[-1]
    if k.shape[:4] != v.shape[:4] or k.shape[-1] != Dqk or k.shape[0] != B or k.shape[3] != H:
        raise ValueError(f"shape mismatch: q_sel {tuple(q_sel.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    dev = q_sel.device
    if kv_index is None:
        X, Y = k.shape[1], k.shape[2]
    else:
        ix, iy = (t.to(device=dev, dtype=torch.long) for t in kv_index)
        X, Y = ix.numel(), iy.numel()
    win_x = neighbour_window(X, kx, dx, dev)
    win_y = neighbour_window(Y, ky, dy, dev)
    checks = []
    if kv_index is not None:
        win_x, win_y = ix[win_x], iy[win_y]
        checks += [ix.min(), ix.max() - (k.shape[1] - 1), iy.min(), iy.max() - (k.shape[2] - 1)]
    full_map = rows is None
    if full_map:
        if cols is not None or M != X * Y:
            raise ValueError(f"full-map mode needs rows = cols = None and M = X*Y = {X * Y}, got M = {M}")
        rows = cols = torch.empty(0, dtype=torch.int32, device=dev)
    else:
        rows = rows.to(device=dev, dtype=torch.int32).contiguous()
        cols = cols.to(device=dev, dtype=torch.int32).contiguous()
        if rows.shape != (M,) or cols.shape != (M,):
            raise ValueError(f"rows/cols must be [M]={M}, got {tuple(rows.shape)} and {tuple(cols.shape)}")
        if M:
            checks += [rows.min(), rows.max() - (X - 1), cols.min(), cols.max() - (Y - 1)]
    if checks:  # one sync; out-of-range indices would read outside k/v
        lo_hi = torch.stack([t.to(torch.int64) for t in checks]).view(-1, 2).tolist()
        if any(lo < 0 or hi > 0 for lo, hi in lo_hi):
            raise IndexError("na2d_at: pixel or kv_index out of range")
    out = torch.empty(B, M, H, Dv, dtype=v.dtype, device=dev)
    if M == 0 or B == 0 or H == 0 or Dv == 0:
        return out
    winx = win_x.to(torch.int32).contiguous()
    winy = win_y.to(torch.int32).contiguous()
    block_dv = min(block_dv, triton.next_power_of_2(Dv))
    grid = (triton.cdiv(M, block_m), B * H, triton.cdiv(Dv, block_dv))
    _na2d_kernel[grid](
        q_sel, k, v, out, rows, cols, winx, winy,
        M, Y, H, kx, ky, Dqk, Dv, (Dqk ** -0.5) * math.log2(math.e),
        *q_sel.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        FULL_MAP=full_map, BLOCK_M=block_m, BLOCK_DQK=triton.next_power_of_2(max(Dqk, 1)), BLOCK_DV=block_dv,
        num_warps=num_warps,
    )
    return out
