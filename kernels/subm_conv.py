"""Submanifold 3x3x3 sparse convolution: pure-torch reference (CPU path and oracle for GPU kernels).

Semantics are those of FlexGEMM's `sparse_submanifold_conv3d` as TRELLIS.2 uses it (golden README §3.2):

    out[n] = bias + sum_{a,b,c in 0..2} W[:, a, b, c, :] @ in[idx(b_n, x_n+a-1, y_n+b-1, z_n+c-1)]

with the weight stored [Co, 3, 3, 3, Ci], the kernel offset flattened as v = 9a + 3b + c, a missing
neighbour contributing zero, and neighbours searched only inside the same batch item. It is a
correlation (no kernel flip) and output sites equal input sites.
"""
from __future__ import annotations

import torch

KERNEL_VOLUME = 27
# offset (dx, dy, dz) of kernel entry v = 9a + 3b + c is (a-1, b-1, c-1)
NEIGHBOR_OFFSETS = torch.tensor([[v // 9 - 1, (v // 3) % 3 - 1, v % 3 - 1] for v in range(KERNEL_VOLUME)], dtype=torch.int64)

# rows gathered per chunk are sized so one gathered block [rows, 27*Ci] stays near this many bytes
DEFAULT_CHUNK_BYTES = 256 << 20


def build_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    """Neighbour map of a coordinate set for the 3x3x3 submanifold conv.

    coords: [N, 4] integer rows (batch, x, y, z), unique. Returns int32 [N, 27]: entry [n, v] is the
    row of voxel (b_n, x_n + a - 1, y_n + b - 1, z_n + c - 1) with v = 9a + 3b + c, or -1 if absent.

    No dense grid: every voxel gets a 64-bit key in a box padded by one cell on each side (so a
    neighbour one step outside the occupied range can never alias another voxel's key), keys are
    sorted once and each of the 27 shifted key sets is found with searchsorted.
    """
    n = coords.shape[0]
    device = coords.device
    if n == 0:
        return torch.empty(0, KERNEL_VOLUME, dtype=torch.int32, device=device)
    c = coords.to(torch.int64)
    xyz = c[:, 1:] - c[:, 1:].amin(dim=0) + 1  # >= 1, so x-1 >= 0 inside the padded box
    ext = xyz.amax(dim=0) + 2  # per-axis padded extent: components of any neighbour lie in [0, ext)
    ex, ey, ez = (int(e) for e in ext.tolist())
    if (int(c[:, 0].max()) + 1) * ex * ey * ez >= 2**63:
        raise ValueError("build_neighbor_map: coordinate range too large for 64-bit keys")
    keys = ((c[:, 0] * ex + xyz[:, 0]) * ey + xyz[:, 1]) * ez + xyz[:, 2]
    sorted_keys, order = torch.sort(keys)
    step = torch.tensor([ey * ez, ez, 1], dtype=torch.int64, device=device)
    shifts = (NEIGHBOR_OFFSETS.to(device) * step).sum(dim=1).tolist()
    nmap = torch.empty(n, KERNEL_VOLUME, dtype=torch.int32, device=device)
    for v, shift in enumerate(shifts):
        q = keys + shift
        pos = torch.searchsorted(sorted_keys, q).clamp_max_(n - 1)
        found = sorted_keys[pos] == q
        nmap[:, v] = torch.where(found, order[pos], -1).to(torch.int32)
    return nmap


def _rows_per_chunk(chunk: int | None, ci: int, itemsize: int) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, DEFAULT_CHUNK_BYTES // max(1, KERNEL_VOLUME * ci * itemsize))


def subm_conv3d(
    feats: torch.Tensor,
    nmap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Submanifold conv by gather + one GEMM per chunk of rows.

    feats [N, Ci] (every voxel of the coordinate set), nmap [R, 27] (-1 = absent): the neighbour-map
    rows of the R output sites wanted (all N, or a slice), weight [Co, 3, 3, 3, Ci], bias [Co] or None.
    chunk: rows per chunk (None: sized so a gathered block is about DEFAULT_CHUNK_BYTES).
    Returns [R, Co] in feats' dtype.
    """
    ci = feats.shape[1]
    co = weight.shape[0]
    if weight.shape[1:] != (3, 3, 3, ci):
        raise ValueError(f"subm_conv3d: weight {tuple(weight.shape)} does not match [Co, 3, 3, 3, {ci}]")
    if nmap.dim() != 2 or nmap.shape[1] != KERNEL_VOLUME:
        raise ValueError(f"subm_conv3d: neighbour map {tuple(nmap.shape)} is not [R, 27]")
    n = nmap.shape[0]
    w = weight.reshape(co, KERNEL_VOLUME * ci).t()  # [27*Ci, Co], rows ordered (v, ci) like the gather
    out = torch.empty(n, co, dtype=feats.dtype, device=feats.device)
    rows = _rows_per_chunk(chunk, ci, feats.element_size())
    for s in range(0, n, rows):
        idx = nmap[s : s + rows].to(torch.int64)
        absent = idx < 0
        g = feats[idx.clamp_min(0)]  # [r, 27, Ci]
        g.masked_fill_(absent.unsqueeze(-1), 0)
        g = g.reshape(idx.shape[0], KERNEL_VOLUME * ci)
        out[s : s + rows] = torch.addmm(bias, g, w) if bias is not None else g @ w
    return out
