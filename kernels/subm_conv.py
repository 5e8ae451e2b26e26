"""Submanifold 3x3x3 sparse convolution: pure-torch reference (CPU path and oracle for GPU kernels).

Semantics are those of FlexGEMM's `sparse_submanifold_conv3d` as TRELLIS.2 uses it (golden README §3.2):

    out[n] = bias + sum_{a,b,c in 0..2} W[:, a, b, c, :] @ in[idx(b_n, x_n+a-1, y_n+b-1, z_n+c-1)]

with the weight stored [Co, 3, 3, 3, Ci], the kernel offset flattened as v = 9a + 3b + c, a missing
neighbour contributing zero, and neighbours searched only inside the same batch item. It is a
correlation (no kernel flip) and output sites equal input sites.

`build_neighbor_map` and `subm_conv3d` are the entry points. On CPU (and whenever a guard fails)
they run the pure-torch references below; on CUDA they dispatch to
- the CUDA hash table (kernels/cuda/hashmap.cuh via kernels/cuda_loader.py) for the neighbour map,
  when CuPy is importable; off with PIXAL3D_DISABLE_CUDA_HASH=1;
- the Triton implicit GEMM (kernels/sparse_conv_triton.py) for fp16/bf16 convs; off with
  PIXAL3D_DISABLE_TRITON_SPCONV=1.
A fast path that fails to load warns once and the reference runs instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import time
import warnings
import weakref

import torch

KERNEL_VOLUME = 27
# offset (dx, dy, dz) of kernel entry v = 9a + 3b + c is (a-1, b-1, c-1); an explicit device, so an
# import inside a `torch.device(...)` context (meta-device checkpoint loading) cannot make it a meta tensor
NEIGHBOR_OFFSETS = torch.tensor([[v // 9 - 1, (v // 3) % 3 - 1, v % 3 - 1] for v in range(KERNEL_VOLUME)],
                                dtype=torch.int64, device="cpu")

# rows gathered per chunk are sized so one gathered block [rows, 27*Ci] stays near this many bytes
DEFAULT_CHUNK_BYTES = 256 << 20
_CHUNK_BYTES = contextvars.ContextVar("subm_conv_chunk_bytes", default=DEFAULT_CHUNK_BYTES)


def chunk_bytes() -> int:
    """Bytes of one gathered chunk (DEFAULT_CHUNK_BYTES unless inside `gather_chunk_bytes`)."""
    return _CHUNK_BYTES.get()


@contextlib.contextmanager
def gather_chunk_bytes(nbytes: int | None):
    """Size the gathered chunks of the convs (and the decoders' row chunks) run inside the block to
    about `nbytes` (None: the default): the memory planner's knob for the decoders' peak."""
    token = _CHUNK_BYTES.set(int(nbytes) if nbytes else DEFAULT_CHUNK_BYTES)
    try:
        yield
    finally:
        _CHUNK_BYTES.reset(token)


def build_neighbor_map_reference(coords: torch.Tensor) -> torch.Tensor:
    """Neighbour map of a coordinate set for the 3x3x3 submanifold conv (pure torch).

    coords: [N, 4] integer rows (batch, x, y, z), unique. Returns int32 [N, 27]: entry [n, v] is the
    row of voxel (b_n, x_n + a - 1, y_n + b - 1, z_n + c - 1) with v = 9a + 3b + c, or -1 if absent.

    No dense grid: every voxel gets a 64-bit key in a box padded by one cell on each side (so a
    neighbour one step outside the occupied range can never alias another voxel's key), keys are
    sorted once and each of the 27 shifted key sets is found with searchsorted.
    """
    table = SortedKeyTable(coords)
    return table.rows(0, table.n)


class SortedKeyTable:
    """The reference's lookup structure (keys, sorted keys, order: 24 B/voxel): `rows(s, e)` is rows
    s:e of `build_neighbor_map_reference`, so a caller can take the map in chunks."""

    def __init__(self, coords: torch.Tensor):
        self.n = n = coords.shape[0]
        self.device = device = coords.device
        if n == 0:
            return
        c = coords.to(torch.int64)
        xyz = c[:, 1:] - c[:, 1:].amin(dim=0) + 1  # >= 1, so x-1 >= 0 inside the padded box
        ext = xyz.amax(dim=0) + 2  # per-axis padded extent: components of any neighbour lie in [0, ext)
        ex, ey, ez = (int(e) for e in ext.tolist())
        if (int(c[:, 0].max()) + 1) * ex * ey * ez >= 2**63:
            raise ValueError("build_neighbor_map: coordinate range too large for 64-bit keys")
        self.keys = ((c[:, 0] * ex + xyz[:, 0]) * ey + xyz[:, 1]) * ez + xyz[:, 2]
        self.sorted_keys, self.order = torch.sort(self.keys)
        step = torch.tensor([ey * ez, ez, 1], dtype=torch.int64, device=device)
        self.shifts = (NEIGHBOR_OFFSETS.to(device) * step).sum(dim=1).tolist()

    def rows(self, s: int, e: int) -> torch.Tensor:
        nmap = torch.empty(max(0, e - s), KERNEL_VOLUME, dtype=torch.int32, device=self.device)
        if nmap.shape[0] == 0:
            return nmap
        keys = self.keys[s:e]
        for v, shift in enumerate(self.shifts):
            q = keys + shift
            pos = torch.searchsorted(self.sorted_keys, q).clamp_max_(self.n - 1)
            found = self.sorted_keys[pos] == q
            nmap[:, v] = torch.where(found, self.order[pos], -1).to(torch.int32)
        return nmap


def _rows_per_chunk(chunk: int | None, ci: int, itemsize: int) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, chunk_bytes() // max(1, KERNEL_VOLUME * ci * itemsize))


def _check_conv_args(feats: torch.Tensor, nmap: torch.Tensor, weight: torch.Tensor) -> None:
    ci = feats.shape[1]
    if weight.shape[1:] != (3, 3, 3, ci):
        raise ValueError(f"subm_conv3d: weight {tuple(weight.shape)} does not match [Co, 3, 3, 3, {ci}]")
    if nmap.dim() != 2 or nmap.shape[1] != KERNEL_VOLUME:
        raise ValueError(f"subm_conv3d: neighbour map {tuple(nmap.shape)} is not [R, 27]")


def subm_conv3d_reference(
    feats: torch.Tensor,
    nmap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Submanifold conv by gather + one GEMM per chunk of rows (pure torch).

    feats [N, Ci] (every voxel of the coordinate set), nmap [R, 27] (-1 = absent): the neighbour-map
    rows of the R output sites wanted (all N, or a slice), weight [Co, 3, 3, 3, Ci], bias [Co] or None.
    chunk: rows per chunk (None: sized so a gathered block is about DEFAULT_CHUNK_BYTES).
    Returns [R, Co] in feats' dtype.
    """
    _check_conv_args(feats, nmap, weight)
    ci = feats.shape[1]
    co = weight.shape[0]
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


# ---------------------------------------------------------------------------------------------
# GPU dispatch


def _disabled(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no", "off")


_warned: set[str] = set()


def _warn_once(kind: str, err: Exception) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"{kind} unavailable, using the pure-torch reference: {err}", RuntimeWarning, stacklevel=3)


def cuda_hash_applies(coords: torch.Tensor) -> bool:
    """Guard of the CUDA neighbour-map path: CUDA coords, not switched off, CuPy importable."""
    if not coords.is_cuda or coords.dtype not in (torch.int32, torch.int64) or _disabled("PIXAL3D_DISABLE_CUDA_HASH"):
        return False
    from pixal3d_rt.kernels.cuda_loader import cupy_available

    return cupy_available()


def build_neighbor_map_cuda(coords: torch.Tensor) -> torch.Tensor:
    """`build_neighbor_map` on the GPU hash table (kernels/cuda/hashmap.cuh); same result as the reference.
    Raises CudaKernelsUnavailable if the module cannot load."""
    table = CudaHashTable(coords)
    return table.rows(0, table.n)


class CudaHashTable:
    """The GPU hash table of a coordinate set (kernels/cuda/hashmap.cuh): keys and the padded box are
    the reference's; 2N..4N slots of int64 key + int32 row (12-24 B/voxel), alive while the object is.
    `rows(s, e)` is rows s:e of the neighbour map. Coordinates with a negative batch index go to the
    reference (keys would meet the table's empty marker)."""

    def __init__(self, coords: torch.Tensor):
        import numpy as np

        from pixal3d_rt.kernels.cuda_loader import load_module

        self.n = n = coords.shape[0]
        self.device = device = coords.device
        self.fallback = None
        if n == 0:
            return
        self.c = c = coords.to(torch.int32).contiguous()
        lo, hi = torch.stack([c.amin(dim=0), c.amax(dim=0)]).tolist()
        if lo[0] < 0:
            self.fallback = SortedKeyTable(coords)
            return
        ex, ey, ez = (hi[k] - lo[k] + 3 for k in (1, 2, 3))  # occupied extent + one cell of padding per side
        if (hi[0] + 1) * ex * ey * ez >= 2**63:
            raise ValueError("build_neighbor_map: coordinate range too large for 64-bit keys")
        capacity = 1 << max(5, (2 * n - 1).bit_length())  # power of two >= 2N: load factor <= 1/2
        self.keys = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.vals = torch.empty(capacity, dtype=torch.int32, device=device)
        self.module = load_module(device.index if device.index is not None else torch.cuda.current_device())
        i64 = np.int64
        self.box = (i64(capacity - 1), i64(lo[1]), i64(lo[2]), i64(lo[3]), i64(ex), i64(ey), i64(ez))
        self.module.launch("pixal3d_hash_insert", n, self._table(0, n) + self.box)

    def _table(self, s: int, e: int) -> tuple:
        import numpy as np

        u64 = np.uint64
        # rows s:e of the int32 [N, 4] coordinates: 16 bytes a row
        return (u64(self.c.data_ptr() + 16 * s), np.int64(e - s), u64(self.keys.data_ptr()), u64(self.vals.data_ptr()))

    def rows(self, s: int, e: int) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback.rows(s, e)
        import numpy as np

        nmap = torch.empty(max(0, e - s), KERNEL_VOLUME, dtype=torch.int32, device=self.device)
        if nmap.shape[0]:
            self.module.launch("pixal3d_hash_neighbors", KERNEL_VOLUME * (e - s),
                               self._table(s, e) + self.box + (np.uint64(nmap.data_ptr()),))
        return nmap


def neighbor_table(coords: torch.Tensor):
    """The lookup structure of `build_neighbor_map` (GPU hash table when its guard holds, else the
    reference's sorted keys), for taking the map in row chunks: `.rows(s, e)`."""
    if cuda_hash_applies(coords):
        from pixal3d_rt.kernels.cuda_loader import CudaKernelsUnavailable

        try:
            return CudaHashTable(coords)
        except CudaKernelsUnavailable as e:
            _warn_once("CUDA neighbour-map kernel", e)
    return SortedKeyTable(coords)


def build_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    """Neighbour map int32 [N, 27] of coords [N, 4] (see `build_neighbor_map_reference` for the
    definition); on CUDA through the GPU hash table when its guard holds."""
    table = neighbor_table(coords)
    return table.rows(0, table.n)


_triton_import_error: Exception | None = None


def triton_conv_applies(feats: torch.Tensor, nmap: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Guard of the Triton path: CUDA fp16/bf16 features and weight of one dtype, int32 map, Triton importable."""
    global _triton_import_error
    if not (feats.is_cuda and nmap.is_cuda and weight.is_cuda and (bias is None or bias.is_cuda)):
        return False
    if feats.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != feats.dtype or nmap.dtype != torch.int32:
        return False
    if _disabled("PIXAL3D_DISABLE_TRITON_SPCONV") or _triton_import_error is not None:
        return False
    try:
        import pixal3d_rt.kernels.sparse_conv_triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - no triton, or a triton without a GPU backend
        _triton_import_error = e
        _warn_once("Triton sparse conv", e)
        return False
    return True


def conv_workspace_bytes_per_row(feats: torch.Tensor, nmap: torch.Tensor, weight: torch.Tensor) -> int:
    """Transient bytes per output row `subm_conv3d` needs besides its output: the reference gathers
    [rows, 27*Ci]; the Triton kernel gathers in registers and needs none. Callers size row chunks with it."""
    if triton_conv_applies(feats, nmap, weight):
        return 0
    return KERNEL_VOLUME * feats.shape[1] * feats.element_size()


# conv plans (row order + tap lists) per neighbour map, kept while the map tensor lives, so every
# conv of a decoder level (and the texture decoder's, which shares the maps) sorts the rows once
_plans: dict[tuple[int, int], tuple[weakref.ref, int, object]] = {}


def _conv_plan(nmap: torch.Tensor, block_m: int):
    from pixal3d_rt.kernels.sparse_conv_triton import conv_plan

    key = (id(nmap), block_m)
    entry = _plans.get(key)
    if entry is not None and entry[0]() is nmap and entry[1] == nmap._version:
        return entry[2]
    plan = conv_plan(nmap, block_m)
    _plans[key] = (weakref.ref(nmap, lambda _, key=key: _plans.pop(key, None)), nmap._version, plan)
    return plan


def subm_conv3d(
    feats: torch.Tensor,
    nmap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Submanifold conv: feats [N, Ci] (every voxel of the coordinate set), nmap int32 [R, 27] (the rows
    of the R output sites wanted, -1 = absent), weight [Co, 3, 3, 3, Ci], bias [Co] or None -> [R, Co]
    in feats' dtype. On CUDA fp16/bf16 the Triton kernel runs (no workspace, `chunk` unused); otherwise
    the reference, gathering `chunk` rows at a time (None: about DEFAULT_CHUNK_BYTES per gather)."""
    _check_conv_args(feats, nmap, weight)
    if triton_conv_applies(feats, nmap, weight, bias):
        from pixal3d_rt.kernels.sparse_conv_triton import subm_conv3d_triton, tile_config

        ci, co = feats.shape[1], weight.shape[0]
        config = tile_config(ci, co, torch.cuda.get_device_capability(feats.device))
        plan = _conv_plan(nmap, config.block_m) if nmap.shape[0] else None
        return subm_conv3d_triton(feats, nmap, weight, bias, plan=plan, config=config)
    return subm_conv3d_reference(feats, nmap, weight, bias, chunk)


def warm_up_gpu_kernels(device: torch.device | str, conv_shapes, dtype: torch.dtype = torch.float16) -> dict:
    """Load the GPU kernels before the first real conv: the CUDA module (fatbin, or NVRTC compile) and
    every Triton tile the given (Ci, Co) convs use (compiled once per machine, later loaded from
    Triton's disk cache). A pipeline calls it while loading the decoders, so their first decode pays
    no kernel loading. Returns seconds spent on each part; does nothing off CUDA."""
    device = torch.device(device)
    spent = {"cuda_hash_s": 0.0, "triton_s": 0.0}
    if device.type != "cuda":
        return spent
    t0 = time.perf_counter()
    xyz = torch.cartesian_prod(*[torch.arange(2, device=device)] * 3)
    coords = torch.cat([torch.zeros(8, 1, dtype=torch.long, device=device), xyz], dim=1).int()
    nmap = build_neighbor_map(coords)
    torch.cuda.synchronize(device)
    spent["cuda_hash_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ci, co in sorted(set(conv_shapes)):
        feats = torch.randn(8, ci, device=device, dtype=dtype)
        weight = torch.randn(co, 3, 3, 3, ci, device=device, dtype=dtype)
        subm_conv3d(feats, nmap, weight, torch.zeros(co, device=device, dtype=dtype))
    torch.cuda.synchronize(device)
    spent["triton_s"] = time.perf_counter() - t0
    return spent
