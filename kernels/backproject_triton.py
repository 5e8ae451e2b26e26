"""Sparse back-projection on the GPU (Triton): active voxels -> per-token image features.

Same function as `conditioning.ImageConditioner.project` (upstream's dense R³ grid, then a gather of
the active voxels), computed for the active voxels only and written straight into one [N, ΣC]
output. Two kernels per feature map:

* `_voxel_taps_kernel`: coords [N, 4] -> the 4 bilinear taps of grid_sample on an h×w map
  (texel ids [N, 4] int32, weights [N, 4] fp32). Projection as upstream, op for op in fp32:
  linspace value, Blender rotation, /mesh_scale/2, inv(F) world->camera, f_px·x/(−z + 1e-8) + S/2,
  the half-pixel shift, then align_corners=False unnormalisation, border clamp, floor.
  Divisions are IEEE round-to-nearest (`div_rn`); Triton's plain fp32 `/` is approximate.
* `_gather_taps_kernel`: out[n, col0:col0+C] = Σ_t w[n,t] · table[idx[n,t], :] (fp32 accumulation),
  where the table is a channels-last map [B·h·w, C] (a view of NAF's output, no copy) or the
  compact features of the texels a lazy map evaluated, slice by slice (taps outside the slice are
  skipped, later slices accumulate), so a lazy map never holds all its texel features at once.

Peak memory is the output plus O(N) tap arrays; no dense grid and no [C, N] transposes.

Fusing the per-block `proj_linear` (features @ Wᵀ + b) is deliberately not done: the projected
features are computed once per stage and reused by 30 blocks × every sampler step, so a fused
sample-and-multiply would redo the sampling 30 times to save one [N, 2048] write.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DISABLE_ENV = "PIXAL3D_DISABLE_TRITON_BACKPROJ"
SENSOR_WIDTH_MM = 32.0
_SUPPORTED_MAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TAPS_BLOCK = 256
_GATHER_BLOCK_N = 32
_GATHER_BLOCK_C = 128


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0") in ("", "0")


@triton.jit
def _voxel_taps_kernel(
    coords_ptr, lin_ptr, params_ptr, tap_idx_ptr, tap_w_ptr,
    N, h, w, batch_stride, size_f, half_size,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = offs.to(tl.int64) * 4
    bi = tl.load(coords_ptr + row, mask=mask, other=0).to(tl.int64)
    ci = tl.load(coords_ptr + row + 1, mask=mask, other=0)
    cj = tl.load(coords_ptr + row + 2, mask=mask, other=0)
    cl = tl.load(coords_ptr + row + 3, mask=mask, other=0)
    gx = tl.load(lin_ptr + ci, mask=mask, other=0.0)
    gy = tl.load(lin_ptr + cj, mask=mask, other=0.0)
    gz = tl.load(lin_ptr + cl, mask=mask, other=0.0)

    # Blender world point (Z-up: grid (x, y, z) -> (x, -z, y)), / mesh_scale / 2 (the /2 is exact)
    zero = tl.full([BLOCK], 0.0, dtype=tl.float32)
    ms = zero + tl.load(params_ptr + 13)
    wx = tl.math.div_rn(gx, ms) * 0.5
    wy = tl.math.div_rn(-gz, ms) * 0.5
    wz = tl.math.div_rn(gy, ms) * 0.5

    # camera frame: rows 0..2 of inv(F) applied to (wx, wy, wz, 1)
    m00 = tl.load(params_ptr + 0)
    m01 = tl.load(params_ptr + 1)
    m02 = tl.load(params_ptr + 2)
    m03 = tl.load(params_ptr + 3)
    m10 = tl.load(params_ptr + 4)
    m11 = tl.load(params_ptr + 5)
    m12 = tl.load(params_ptr + 6)
    m13 = tl.load(params_ptr + 7)
    m20 = tl.load(params_ptr + 8)
    m21 = tl.load(params_ptr + 9)
    m22 = tl.load(params_ptr + 10)
    m23 = tl.load(params_ptr + 11)
    f_px = tl.load(params_ptr + 12)
    xc = m00 * wx + m01 * wy + m02 * wz + m03
    yc = m10 * wx + m11 * wy + m12 * wz + m13
    zc = m20 * wx + m21 * wy + m22 * wz + m23

    den = -zc + 1e-8
    u = tl.math.div_rn(f_px * xc, den) + half_size
    v = -tl.math.div_rn(f_px * yc, den) + half_size
    size_v = zero + size_f
    sx = tl.math.div_rn(u + 0.5, size_v) * 2.0 - 1.0
    sy = tl.math.div_rn(v + 0.5, size_v) * 2.0 - 1.0

    # grid_sample, bilinear, align_corners=False, border padding
    wf = w * 1.0  # (not .to(): Triton passes an int argument equal to 1 as a constexpr)
    hf = h * 1.0
    ix = ((sx + 1.0) * wf - 1.0) * 0.5
    iy = ((sy + 1.0) * hf - 1.0) * 0.5
    ix = tl.minimum(tl.maximum(ix, 0.0), wf - 1.0)
    iy = tl.minimum(tl.maximum(iy, 0.0), hf - 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    tx = ix - x0f
    ty = iy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    # a tap past the last texel only occurs with weight 0: clamping keeps it addressable
    x1 = tl.minimum(x0 + 1, w - 1)
    y1 = tl.minimum(y0 + 1, h - 1)
    base = bi * batch_stride
    out = offs.to(tl.int64) * 4
    tl.store(tap_idx_ptr + out + 0, (base + y0 * w + x0).to(tl.int32), mask=mask)
    tl.store(tap_idx_ptr + out + 1, (base + y0 * w + x1).to(tl.int32), mask=mask)
    tl.store(tap_idx_ptr + out + 2, (base + y1 * w + x0).to(tl.int32), mask=mask)
    tl.store(tap_idx_ptr + out + 3, (base + y1 * w + x1).to(tl.int32), mask=mask)
    tl.store(tap_w_ptr + out + 0, (1.0 - tx) * (1.0 - ty), mask=mask)
    tl.store(tap_w_ptr + out + 1, tx * (1.0 - ty), mask=mask)
    tl.store(tap_w_ptr + out + 2, (1.0 - tx) * ty, mask=mask)
    tl.store(tap_w_ptr + out + 3, tx * ty, mask=mask)


@triton.jit
def _gather_taps_kernel(
    table_ptr, tap_idx_ptr, tap_w_ptr, out_ptr,
    N, C, table_stride, out_stride, col0, lo, hi,
    ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # taps whose index lies outside [lo, hi) are left to another launch (table = rows lo..hi-1)
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mn = rn < N
    mc = rc < C
    mask = mn[:, None] & mc[None, :]
    rn4 = rn.to(tl.int64) * 4
    out_ptrs = out_ptr + rn.to(tl.int64)[:, None] * out_stride + col0 + rc[None, :]
    if ACCUMULATE:
        acc = tl.load(out_ptrs, mask=mask, other=0.0)
    else:
        acc = tl.full([BLOCK_N, BLOCK_C], 0.0, dtype=tl.float32)
    for t in tl.static_range(4):
        idx = tl.load(tap_idx_ptr + rn4 + t, mask=mn, other=lo).to(tl.int64)
        hit = mn & (idx >= lo) & (idx < hi)
        wt = tl.load(tap_w_ptr + rn4 + t, mask=hit, other=0.0)
        vals = tl.load(table_ptr + (idx - lo)[:, None] * table_stride + rc[None, :], mask=hit[:, None] & mc[None, :], other=0.0)
        acc += wt[:, None] * vals.to(tl.float32)
    tl.store(out_ptrs, acc, mask=mask)


def camera_params(fov, distance, image_size: int, mesh_scale, device) -> torch.Tensor:
    """fp32 [16] on `device`: rows 0..2 of inv(F) (12), f_px, mesh_scale, computed on the CPU with
    the reference's own fp32 ops (inv(F) is exact: F is a signed permutation plus the distance) and
    copied over, so no GPU linear-algebra call or host sync is needed."""
    f32 = lambda x: torch.as_tensor(x, dtype=torch.float32).reshape(1)  # noqa: E731
    cam_to_world = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    cam_to_world[1, 3] = -f32(distance)[0]
    world_to_cam = torch.linalg.inv(cam_to_world)
    f_px = 16.0 / torch.tan(f32(fov) / 2.0) * image_size / SENSOR_WIDTH_MM
    params = torch.cat([world_to_cam[:3].reshape(12), f_px, f32(mesh_scale), torch.zeros(2)])
    return params.to(device)


def voxel_taps(coords: torch.Tensor, R: int, params: torch.Tensor, image_size: int, h: int, w: int,
               batch_stride: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps of the projected voxels on an h×w map: texel ids b·batch_stride + y·w + x
    (int32 [N, 4], order (y0,x0), (y0,x1), (y1,x0), (y1,x1)) and weights (fp32 [N, 4])."""
    N = coords.shape[0]
    dev = coords.device
    idx = torch.empty(N, 4, dtype=torch.int32, device=dev)
    wts = torch.empty(N, 4, dtype=torch.float32, device=dev)
    if N == 0:
        return idx, wts
    lin = torch.linspace(-1, 1, R, device=dev)  # the reference's grid values, bit for bit
    coords = coords.to(torch.int32).contiguous()
    grid = (triton.cdiv(N, _TAPS_BLOCK),)
    _voxel_taps_kernel[grid](
        coords, lin, params, idx, wts, N, h, w, batch_stride, float(image_size), image_size / 2.0,
        BLOCK=_TAPS_BLOCK, num_warps=4,
    )
    return idx, wts


def gather_taps(table: torch.Tensor, tap_idx: torch.Tensor, tap_w: torch.Tensor, out: torch.Tensor, col0: int,
                rows_from: int = 0, accumulate: bool = False) -> None:
    """out[:, col0:col0+C] (+)= Σ_t tap_w[:, t] · table[tap_idx[:, t] − rows_from] over the taps whose
    index falls in [rows_from, rows_from + M): table [M, C] with unit channel stride. Taps split over
    several tables (ascending index ranges) are summed in tap order, as in one launch."""
    N = tap_idx.shape[0]
    M, C = table.shape
    if N == 0 or C == 0:
        return
    if table.stride(1) != 1:
        table = table.contiguous()
    grid = (triton.cdiv(N, _GATHER_BLOCK_N), triton.cdiv(C, _GATHER_BLOCK_C))
    _gather_taps_kernel[grid](
        table, tap_idx.contiguous(), tap_w.contiguous(), out, N, C, table.stride(0), out.stride(0), col0,
        rows_from, rows_from + M,
        ACCUMULATE=accumulate, BLOCK_N=_GATHER_BLOCK_N, BLOCK_C=_GATHER_BLOCK_C, num_warps=4,
    )


def _is_lazy(m) -> bool:
    return not isinstance(m, torch.Tensor) and hasattr(m, "texel_features")


def _texel_chunks(m, texels: torch.Tensor):
    """(first row, features) of consecutive slices of texels: the lazy map's own chunking where it
    has one (bounded memory), else all at once."""
    if hasattr(m, "texel_feature_chunks"):
        yield from m.texel_feature_chunks(texels)
    else:
        yield 0, m.texel_features(texels)


def supported(coords: torch.Tensor, maps) -> bool:
    """Shape/dtype/device guard of `backproject` (the caller falls back to the reference)."""
    if not (enabled() and coords.is_cuda and coords.dim() == 2 and coords.shape[1] == 4):
        return False
    if coords.dtype not in (torch.int32, torch.int64):
        return False
    for m in maps:
        if _is_lazy(m):
            continue
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.device != coords.device or m.dtype not in _SUPPORTED_MAP_DTYPES:
            return False
        if m.shape[0] * m.shape[2] * m.shape[3] >= 2**31:
            return False
    return True


def backproject(coords: torch.Tensor, R: int, fov, distance, mesh_scale, image_size: int, maps) -> torch.Tensor:
    """Features of active voxels: coords int [N, 4] (batch, x, y, z) on the corner-aligned R³ grid
    -> fp32 [N, ΣC], the channels of `maps` in order. A map is a tensor [B, C, h, w] (batch b of the
    voxels samples map b; a map of batch 1 serves every b) or a lazy map with `.shape` (1, C, h, w)
    and `texel_features(texel_ids int64 [M]) -> [M, C]` evaluated at the sampled texels only
    (optionally `texel_feature_chunks(texel_ids)` yielding (first row, [m, C]) slices in order)."""
    dev = coords.device
    N = coords.shape[0]
    params = camera_params(fov, distance, image_size, mesh_scale, dev)
    total_c = sum(int(m.shape[1]) for m in maps)
    out = torch.empty(N, total_c, dtype=torch.float32, device=dev)
    col = 0
    for m in maps:
        B, C, h, w = (int(s) for s in m.shape)
        if _is_lazy(m):
            tap_idx, tap_w = voxel_taps(coords, R, params, image_size, h, w, 0)
            if N:
                texels, inverse = torch.unique(tap_idx.view(-1), return_inverse=True)  # sorted ids
                inverse = inverse.view(N, 4).to(torch.int32)
                for i, (m0, feats) in enumerate(_texel_chunks(m, texels.long())):
                    gather_taps(feats, inverse, tap_w, out, col, rows_from=m0, accumulate=i > 0)
        else:
            if B > 1 and N and int(coords[:, 0].max()) >= B:
                raise ValueError(f"voxel batch index beyond the {B} feature maps")
            tap_idx, tap_w = voxel_taps(coords, R, params, image_size, h, w, h * w if B > 1 else 0)
            # channels-last table: a view for NAF's output and DINOv3's patch map
            table = m.permute(0, 2, 3, 1).reshape(B * h * w, C)
            gather_taps(table, tap_idx, tap_w, out, col)
        col += C
    return out
