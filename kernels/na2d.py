"""2-D neighbourhood attention: a pure-torch reference of `natten.na2d` (golden README §3.1).

NAF is the only user of natten in Pixal3D. This module reproduces NATTEN's non-causal, stride-1
`na2d` exactly (window clamping inside each dilation group, unequal group lengths when the
dilation does not divide the length), without natten:

    q, k: [B, X, Y, H, Dqk]    v: [B, X, Y, H, Dv]    out: [B, X, Y, H, Dv]
    out[b,x,y,h] = softmax_n(Dqk^-0.5 · q[b,x,y,h] · k[b,n,h]) · v[b,n,h]
    n ranges over window_x[x] × window_y[y] (see `neighbour_window`).

Memory is bounded by evaluating query pixels in chunks: a chunk gathers its kx·ky keys and values
per pixel, so the peak is about `max_elements` gathered elements however large the map is.

`na2d_at` evaluates only selected query pixels; with `kv_index` it reads K/V through per-axis
index maps instead of a materialised map, so NAF's nearest-exact ×d upsampled keys and values
(4 GiB at T = 1024 in the texture stage) never have to exist.

Dispatch: on CUDA, `na2d` and `na2d_at` run the Triton kernel of `na2d_triton` (behind its guards;
PIXAL3D_DISABLE_TRITON_NA2D=1 turns it off); elsewhere, and as the oracle, the torch reference
`na2d_at_reference` / `na2d_reference`.
"""
from __future__ import annotations

import os

import torch

# gathered K+V elements per chunk (fp32: 256 MiB); large enough to keep GPU kernels busy
DEFAULT_MAX_ELEMENTS = 1 << 26


def _pair(v) -> tuple[int, int]:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, int):
        return (v, v)
    a, b = (int(x) for x in v)
    return (a, b)


def neighbour_window(length: int, kernel_size: int, dilation: int, device=None) -> torch.Tensor:
    """Neighbour indices [length, kernel_size] (int64) along one axis, NATTEN's definition.

    Position i lies in dilation group g = i mod d at index s = i div d. Group g has
    Lg = L div d (+1 if g < L mod d) members; the window centre s is clamped to
    [k//2, Lg-1-k//2] so the window stays inside the group; neighbours are (c+o)·d + g.
    """
    k, d, L = int(kernel_size), int(dilation), int(length)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {k}")
    if d < 1:
        raise ValueError(f"dilation must be >= 1, got {d}")
    if k * d > L:
        raise ValueError(f"kernel_size*dilation = {k}*{d} exceeds the axis length {L} (NATTEN requires <=)")
    i = torch.arange(L, device=device)
    g = i % d
    s = i // d
    group_len = L // d + (g < L % d).long()
    half = k // 2
    c = torch.minimum(torch.clamp(s, min=half), group_len - 1 - half)
    o = torch.arange(-half, half + 1, device=device)
    return (c[:, None] + o[None, :]) * d + g[:, None]


def _triton_na2d(q_sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The Triton module when it should run these tensors, else None."""
    if not q_sel.is_cuda or os.environ.get("PIXAL3D_DISABLE_TRITON_NA2D", "0") not in ("", "0"):
        return None
    try:
        from pixal3d_rt.kernels import na2d_triton
    except ImportError:  # no triton in this environment
        return None
    return na2d_triton if na2d_triton.supported(q_sel, k, v) else None


def na2d_at(
    q_sel: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    kernel_size,
    dilation,
    *,
    kv_index: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Neighbourhood attention at selected query pixels (Triton on CUDA, else the reference).
    Arguments as `na2d_at_reference`; rows = cols = None means every pixel in raster order."""
    tri = _triton_na2d(q_sel, k, v)
    if tri is not None:
        return tri.na2d_at_triton(q_sel, k, v, rows, cols, kernel_size, dilation, kv_index=kv_index)
    return na2d_at_reference(q_sel, k, v, rows, cols, kernel_size, dilation, kv_index=kv_index, max_elements=max_elements)


def na2d_at_reference(
    q_sel: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    kernel_size,
    dilation,
    *,
    kv_index: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Neighbourhood attention at selected query pixels only (pure torch).

    q_sel: [B, M, H, Dqk], the queries of pixels (rows[m], cols[m]) (int64 [M] each); rows = cols
      = None: every pixel of the X×Y map in raster order (M = X·Y).
    k: [B, X', Y', H, Dqk], v: [B, X', Y', H, Dv].
    kv_index: None when k/v are the full X×Y maps (X' = X); otherwise (ix [X], iy [Y]) int64 maps
      from each full-map position to its row/column of k and v, i.e. the full maps are
      k[:, ix][:, :, iy] (a nearest-neighbour upsampling is such a map). The attention window is
      computed on the full X×Y extent either way.
    Returns [B, M, H, Dv], in v's dtype; equal to `na2d(q, k, v, ...)[:, rows, cols]`.
    """
    kx, ky = _pair(kernel_size)
    dx, dy = _pair(dilation)
    B, M, H, Dqk = q_sel.shape
    Dv = v.shape[-1]
    if k.shape[:4] != v.shape[:4] or k.shape[-1] != Dqk or k.shape[0] != B or k.shape[3] != H:
        raise ValueError(f"shape mismatch: q_sel {tuple(q_sel.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    dev = q_sel.device
    if kv_index is None:
        X, Y = k.shape[1], k.shape[2]
        ix = iy = None
    else:
        ix, iy = (t.to(device=dev, dtype=torch.long) for t in kv_index)
        X, Y = ix.numel(), iy.numel()
    win_x = neighbour_window(X, kx, dx, dev)
    win_y = neighbour_window(Y, ky, dy, dev)
    if ix is not None:  # map full-map neighbours to rows/columns of the given k and v
        win_x, win_y = ix[win_x], iy[win_y]
    if rows is None and cols is None:
        rows = torch.arange(X, device=dev).repeat_interleave(Y)
        cols = torch.arange(Y, device=dev).repeat(X)
    rows = rows.to(device=dev, dtype=torch.long)
    cols = cols.to(device=dev, dtype=torch.long)
    if rows.shape != (M,) or cols.shape != (M,):
        raise ValueError(f"rows/cols must be [M]={M}, got {tuple(rows.shape)} and {tuple(cols.shape)}")

    scale = Dqk ** -0.5
    nk = kx * ky
    chunk = max(1, int(max_elements) // max(1, B * nk * H * (Dqk + Dv)))
    out = torch.empty(B, M, H, Dv, dtype=v.dtype, device=dev)
    for m0 in range(0, M, chunk):
        m1 = min(M, m0 + chunk)
        nx = win_x[rows[m0:m1]][:, :, None].expand(-1, kx, ky)  # [m, kx, ky]
        ny = win_y[cols[m0:m1]][:, None, :].expand(-1, kx, ky)
        kn = k[:, nx, ny].flatten(2, 3)  # [B, m, kx*ky, H, Dqk]
        vn = v[:, nx, ny].flatten(2, 3)  # [B, m, kx*ky, H, Dv]
        qc = q_sel[:, m0:m1]
        # logits and softmax in fp32 whatever the storage dtype
        logits = torch.einsum("bmhd,bmnhd->bmhn", qc.float(), kn.float()) * scale
        p = logits.softmax(dim=-1)
        out[:, m0:m1] = torch.einsum("bmhn,bmnhd->bmhd", p, vn.float()).to(v.dtype)
    return out


def na2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size,
    dilation=1,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """natten.na2d(q, k, v, kernel_size, dilation) (non-causal, stride 1, scale Dqk^-0.5).

    q, k: [B, X, Y, H, Dqk]; v: [B, X, Y, H, Dv] -> [B, X, Y, H, Dv]. Triton on CUDA.
    """
    B, X, Y, H, Dqk = q.shape
    if k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    # a view where the layout allows (the kernel takes any strides)
    out = na2d_at(q.flatten(1, 2), k, v, None, None, kernel_size, dilation, max_elements=max_elements)
    return out.view(B, X, Y, H, v.shape[-1])


def na2d_reference(q, k, v, kernel_size, dilation=1, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """`na2d` always through the torch reference (the oracle of the GPU kernel)."""
    B, X, Y, H, Dqk = q.shape
    if k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    out = na2d_at_reference(q.reshape(B, X * Y, H, Dqk), k, v, None, None, kernel_size, dilation, max_elements=max_elements)
    return out.view(B, X, Y, H, v.shape[-1])
