"""Row LayerNorm computed in fp32 on fp16/bf16 rows without fp32 copies of the activations.

The decoders' LayerNorm32 (upstream: cast to fp32, normalise, cast back) reads and writes three
full-size tensors at the fine levels (4.6 M voxels × 64 channels); this kernel loads the half-precision
row, accumulates mean and variance in fp32, applies the fp32 affine and stores in the input dtype:
one read, one write. The pure-torch reference is `layer_norm_reference`, the CPU path and the oracle.
Used on CUDA fp16/bf16 inputs; PIXAL3D_DISABLE_TRITON_LAYERNORM=1 turns it off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional dependency
    triton = None


def layer_norm_reference(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Upstream LayerNorm32: fp32 layer norm over the last dim, result in x's dtype."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    return F.layer_norm(y, y.shape[-1:], weight, bias, eps).to(x.dtype)


if triton is not None:

    @triton.jit
    def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n_rows, C, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        y = d * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm_triton(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """x [..., C] contiguous; weight/bias [C] (any float dtype) or None -> same shape and dtype as x."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    y = torch.empty_like(x2)
    n = x2.shape[0]
    if n == 0:
        return y.view(x.shape)
    block_c = triton.next_power_of_2(C)
    rows = max(1, min(64, 4096 // block_c))  # about 4k elements per program
    grid = (triton.cdiv(n, rows),)
    _layer_norm_kernel[grid](x2, weight if weight is not None else x2, bias if bias is not None else x2, y, n, C, float(eps),
                             HAS_W=weight is not None, HAS_B=bias is not None, ROWS=rows, BLOCK_C=block_c,
                             num_warps=4 if block_c <= 1024 else 8)
    return y.view(x.shape)


def layer_norm(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm32 with the Triton kernel where it applies (CUDA, fp16/bf16, contiguous)."""
    if (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.is_contiguous()
            and x.shape[-1] <= 8192 and os.environ.get("PIXAL3D_DISABLE_TRITON_LAYERNORM") != "1"):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)
