"""SC-VAE decoders of TRELLIS.2 / Pixal3D: sparse-conv U-Nets that grow a latent into fine voxels.

Upstream: pixal3d/models/sc_vaes/{sparse_unet_vae.py, fdg_vae.py} and the sparse conv/linear/C2S
modules they use (golden README §2.2). `SparseUnetVaeDecoder` is the texture decoder (6 PBR
channels, topology from `guide_subs`); `FlexiDualGridVaeDecoder` is the shape decoder (7 channels,
predicts its own subdivisions). State-dict keys are upstream's; submanifold conv weights are in
FlexGEMM's layout [Co, 3, 3, 3, Ci].

Memory: fine levels reach millions of voxels, so the convs, the ConvNeXt MLPs, the C2S gathers and
the output head all run over row chunks (`chunk_size` rows; None = sized from a byte budget).
Neighbour maps live in each level's SparseTensor cache; a `cache` dict passed to `forward` (keyed by
level index) keeps them, so the texture decoder can reuse the shape decoder's maps level by level.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixal3d_rt.kernels.layernorm import layer_norm
from pixal3d_rt.kernels.subm_conv import (KERNEL_VOLUME, build_neighbor_map, chunk_bytes, conv_workspace_bytes_per_row,
                                          neighbor_table, subm_conv3d)
from pixal3d_rt.mesh.fdg import flexible_dual_grid_to_mesh
from pixal3d_rt.models.sparse import SparseTensor

NMAP_KEY = "subm_conv3x3x3_nmap"


def neighbor_map(x: SparseTensor) -> torch.Tensor:
    """The [N, 27] neighbour map of x's coordinates, built once and kept in x.cache."""
    nmap = x.cache.get(NMAP_KEY)
    if nmap is None:
        nmap = build_neighbor_map(x.coords)
        x.cache[NMAP_KEY] = nmap
    return nmap


def _chunk_rows(chunk_size: int | None, row_bytes: int) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, chunk_bytes() // max(1, row_bytes))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32 (weights stay fp32 under use_fp16), result in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)  # fp32 math; Triton on CUDA half inputs


class SubMConv3d(nn.Module):
    """3x3x3 submanifold sparse conv (stride 1), weight [Co, 3, 3, 3, Ci] as in FlexGEMM checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv3d's default init, with fan_in = 27·Ci
        bound = 1.0 / math.sqrt(27 * self.in_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, feats: torch.Tensor, nmap: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """feats [N, Ci] (all rows of the level), nmap [R, 27] (the rows to compute) -> [R, Co]."""
        return subm_conv3d(feats, nmap, self.weight, self.bias, chunk_size)


class SparseConvNeXtBlock3d(nn.Module):
    """out = x + Linear(SiLU(Linear(LN(SubMConv(x)))))."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0, use_checkpoint: bool = False):
        super().__init__()
        self.channels = channels
        hidden = int(channels * mlp_ratio)
        self.norm = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.conv = SubMConv3d(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x: SparseTensor, chunk_size: int | None = None) -> SparseTensor:
        h = self.conv(x.feats, neighbor_map(x), chunk_size)
        out = torch.empty_like(h)
        rows = _chunk_rows(chunk_size, self.mlp[0].out_features * 4)
        for s in range(0, h.shape[0], rows):
            out[s : s + rows] = self.mlp(self.norm(h[s : s + rows])) + x.feats[s : s + rows]
        return x.replace(out)


def channel_to_spatial_index(coords: torch.Tensor, keep: torch.Tensor):
    """Children of a 2x channel-to-spatial step.

    coords [N, 4], keep bool [N, 8]. Parent p makes one child per set bit j of keep[p], ascending j,
    parent-major; the child sits at 2·coord[p] + (j & 1, (j >> 1) & 1, (j >> 2) & 1).
    Returns (child coords int32 [M, 4], slot int64 [M] = 8·parent + j, child count per parent [N]).
    """
    counts = keep.sum(dim=1)
    slot = keep.reshape(-1).nonzero().squeeze(1)  # row-major: parent-major, ascending j
    j = slot & 7
    bits = torch.stack([j & 1, (j >> 1) & 1, (j >> 2) & 1], dim=1).to(coords.dtype)
    del j
    child = coords[slot >> 3]
    child[:, 1:] = child[:, 1:] * 2 + bits
    return child, slot, counts


class SparseResBlockC2S3d(nn.Module):
    """Up-block: 2x channel-to-spatial subdivision, keeping the children whose subdivision logit is > 0.

    h = C2S(SubMConv(SiLU(LN(x))))                      C -> 8·C', one C'-slice per child
    out = SubMConv(SiLU(LN_noaffine(h))) + repeat_interleave(C2S(x), C' // (C/8))
    """

    def __init__(self, channels: int, out_channels: int | None = None, use_checkpoint: bool = False, pred_subdiv: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.pred_subdiv = pred_subdiv
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(self.out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SubMConv3d(channels, self.out_channels * 8)
        self.conv2 = SubMConv3d(self.out_channels, self.out_channels)
        if pred_subdiv:
            self.to_subdiv = nn.Linear(channels, 8)

    def subdivision(self, x: SparseTensor, subdiv: torch.Tensor | None) -> torch.Tensor:
        """Subdivision logits [N, 8]: the given ones (the texture decoder's guide, or a structure's
        replacement), else predicted (shape decoder)."""
        if subdiv is None:
            if self.pred_subdiv:
                return self.to_subdiv(x.feats)
            raise ValueError("SparseResBlockC2S3d with pred_subdiv=False needs the subdivision (guide_subs)")
        if subdiv.shape != (x.feats.shape[0], 8):
            raise ValueError(f"guide subdivision {tuple(subdiv.shape)} does not match [{x.feats.shape[0]}, 8]")
        return subdiv

    def forward(
        self,
        x: SparseTensor,
        subdiv: torch.Tensor | None = None,
        chunk_size: int | None = None,
        child_cache=None,
        epilogue=None,
    ) -> tuple[SparseTensor, torch.Tensor]:
        """Returns (children SparseTensor, subdivision logits [N, 8] at x's coords).

        child_cache: optional function child coords -> the cache dict for the children's SparseTensor
        (lets a caller hand in neighbour maps already built for the same coordinates).
        epilogue: optional row-wise function applied to the block's output, fused into the last conv's
        row chunks (the decoder's output head when nothing else runs at the children's level), so the
        C'-wide output of the finest level is never held whole; the children then carry its result.
        """
        logits = self.subdivision(x, subdiv)
        child_coords, slot, counts = channel_to_spatial_index(x.coords, logits > 0)
        n, m = x.feats.shape[0], child_coords.shape[0]
        co = self.out_channels
        nmap = neighbor_map(x)
        a = F.silu(self.norm1(x.feats))
        # conv1 over parent chunks; each chunk's children are a contiguous range (parent-major order)
        h = torch.empty(m, co, dtype=a.dtype, device=a.device)
        child_start = torch.cumsum(counts, 0) - counts
        # per parent row: the conv's own workspace (the reference's gather; none on the GPU kernel)
        # plus the 8·C' outputs of the chunk
        conv_bytes = conv_workspace_bytes_per_row(a, nmap, self.conv1.weight)
        rows = _chunk_rows(chunk_size, conv_bytes + 8 * co * a.element_size())
        for s in range(0, n, rows):
            e = min(n, s + rows)
            c0 = int(child_start[s])
            c1 = int(child_start[e - 1] + counts[e - 1])
            if c1 == c0:
                continue
            hp = self.conv1(a, nmap[s:e], chunk_size).reshape((e - s) * 8, co)
            h[c0:c1] = hp[slot[c0:c1] - 8 * s]
            del hp  # before the next chunk's conv: one chunk output alive at a time
        del a
        out = SparseTensor(h, child_coords, {} if child_cache is None else child_cache(child_coords))
        rows_h = _chunk_rows(chunk_size, co * 4)
        for s in range(0, m, rows_h):
            h[s : s + rows_h] = F.silu(self.norm2(h[s : s + rows_h]))
        xs = x.feats.reshape(n * 8, self.channels // 8)
        rep = co // (self.channels // 8)

        def skip(s: int, e: int) -> torch.Tensor:
            """The children's slices of x, channels repeated up to C', for children rows s:e."""
            return xs[slot[s:e]].repeat_interleave(rep, dim=1)

        if epilogue is None:
            h = self.conv2(h, neighbor_map(out), chunk_size)
            for s in range(0, m, rows_h):
                h[s : s + rows_h] += skip(s, s + rows_h)
            return out.replace(h), logits
        # the finest level: its neighbour map is taken in row chunks from the lookup table (unless a
        # caller handed it in), never held whole (108 B/voxel)
        nmap_out = out.cache.get(NMAP_KEY)
        table = neighbor_table(child_coords) if nmap_out is None else None
        # per row: the conv's workspace, its map rows, and about 16 bytes per channel of conv output,
        # skip and the epilogue's fp32 temporaries
        map_rows = torch.empty(0, KERNEL_VOLUME, dtype=torch.int32, device=h.device)
        rows_e = _chunk_rows(chunk_size, conv_workspace_bytes_per_row(h, map_rows, self.conv2.weight)
                             + 4 * KERNEL_VOLUME + co * 16)
        res = None
        for s in range(0, m, rows_e):
            e = min(m, s + rows_e)
            nmap_rows = nmap_out[s:e] if table is None else table.rows(s, e)
            y = epilogue(self.conv2(h, nmap_rows, chunk_size) + skip(s, e))
            del nmap_rows
            if res is None:
                res = torch.empty(m, y.shape[1], dtype=y.dtype, device=y.device)
            res[s:e] = y
        if res is None:  # no children
            res = epilogue(h[:0])
        return out.replace(res), logits


BLOCK_TYPES = {"SparseConvNeXtBlock3d": SparseConvNeXtBlock3d}
UP_BLOCK_TYPES = {"SparseResBlockC2S3d": SparseResBlockC2S3d}
_HALF_PRECISION_LAYERS = (nn.Linear, SubMConv3d)


def _same_coords(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and (a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b)))


class SparseUnetVaeDecoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        model_channels: list[int],
        latent_channels: int,
        num_blocks: list[int],
        block_type: list[str],
        up_block_type: list[str],
        block_args: list[dict],
        use_fp16: bool = False,
        pred_subdiv: bool = True,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.model_channels = list(model_channels)
        self.latent_channels = latent_channels
        self.num_blocks = list(num_blocks)
        self.pred_subdiv = pred_subdiv
        self.use_fp16 = use_fp16
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.low_vram = False  # upstream pipeline sets it; unused, as upstream
        self.chunk_size: int | None = None  # rows per chunk; None = from a byte budget
        # fuse the output head into the last up-block's final conv when the last level has no blocks
        # (saves holding the finest level's C-wide output: ~0.6 GB at 4.6 M voxels). None = on CUDA
        # only, so CPU runs keep every block's output observable as upstream's (golden mids).
        self.fuse_head: bool | None = None
        # optional: an object whose subdivision(coords, grid, logits) replaces the predicted
        # subdivisions (benchmarks give a reference shape's structure to random weights); level 0's
        # grid is then `resolution` / 2^(number of up-blocks)
        self.structure = None

        self.output_layer = nn.Linear(model_channels[-1], out_channels)
        self.from_latent = nn.Linear(latent_channels, model_channels[0])
        self.blocks = nn.ModuleList()
        for i, nb in enumerate(num_blocks):
            level = nn.ModuleList()
            for _ in range(nb):
                if block_type[i] not in BLOCK_TYPES:
                    raise ValueError(f"unsupported block type {block_type[i]!r}")
                level.append(BLOCK_TYPES[block_type[i]](model_channels[i], **block_args[i]))
            if i < len(num_blocks) - 1:
                if up_block_type[i] not in UP_BLOCK_TYPES:
                    raise ValueError(f"unsupported up-block type {up_block_type[i]!r}")
                level.append(UP_BLOCK_TYPES[up_block_type[i]](model_channels[i], model_channels[i + 1], pred_subdiv=pred_subdiv, **block_args[i]))
            self.blocks.append(level)
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Block Linear/conv weights in fp16 as upstream; norms, from_latent and output_layer stay fp32."""
        self._convert_blocks(torch.float16)

    def convert_to_fp32(self) -> None:
        self._convert_blocks(torch.float32)

    def _convert_blocks(self, dtype: torch.dtype) -> None:
        self.use_fp16, self.dtype = dtype == torch.float16, dtype
        for m in self.blocks.modules():
            if isinstance(m, _HALF_PRECISION_LAYERS):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)

    @staticmethod
    def _level_cache(cache: dict | None, level: int, coords: torch.Tensor, default: dict) -> dict:
        """The SparseTensor cache dict for one level: the caller's entry if its coords match, else new."""
        if cache is None:
            return default
        entry = cache.get(level)
        if entry is not None and _same_coords(entry.get("coords"), coords):
            return entry
        entry = {"coords": coords}
        cache[level] = entry
        return entry

    def _run(self, x: SparseTensor, guide_subs, cache: dict | None, stop_level: int | None = None, head_dtype: torch.dtype | None = None):
        """Shared trunk. Returns (h at the last level reached, per up-block the subdivision logits
        [N_i, 8] as a SparseTensor at the coordinates of the level they subdivide, whether h is already
        the output head's result).

        With stop_level = K, stops once the coordinates of level K are known and returns a
        SparseTensor with those coordinates and no channels (the last up-block's convs are skipped).
        With head_dtype, when the last level has no blocks, the output head (in head_dtype) is fused
        into the last up-block's final conv (see SparseResBlockC2S3d.forward's epilogue).
        """
        if guide_subs is not None and self.pred_subdiv:
            raise ValueError("guide_subs is only for decoders with pred_subdiv=False")
        chunk = self.chunk_size
        feats = self.from_latent(x.feats.to(self.from_latent.weight.dtype)).to(self.dtype)
        h = SparseTensor(feats, x.coords, self._level_cache(cache, 0, x.coords, x.cache))
        if stop_level == 0:
            return SparseTensor(h.feats[:, :0], h.coords), [], False
        subs = []
        last = len(self.blocks) - 1
        fuse_head = head_dtype is not None and stop_level is None and last > 0 and len(self.blocks[last]) == 0
        for i, level in enumerate(self.blocks):
            for j, block in enumerate(level):
                if not (i < last and j == len(level) - 1):
                    h = block(h, chunk)
                    continue
                guide = None if guide_subs is None else guide_subs[i].feats
                if self.structure is not None:
                    grid = self.resolution * 2 ** i // 2 ** (len(self.blocks) - 1)
                    guide = self.structure.subdivision(h.coords, grid, block.subdivision(h, None), self.resolution)
                if stop_level is not None and i == stop_level - 1:
                    logits = block.subdivision(h, guide)
                    child, *_ = channel_to_spatial_index(h.coords, logits > 0)
                    return SparseTensor(h.feats.new_zeros(child.shape[0], 0), child), subs + [SparseTensor(logits, h.coords)], False
                parent_coords = h.coords
                epilogue = (lambda f: self._head_rows(f, head_dtype)) if fuse_head and i == last - 1 else None
                h, logits = block(h, guide, chunk, child_cache=lambda c, lvl=i + 1: self._level_cache(cache, lvl, c, {}), epilogue=epilogue)
                subs.append(SparseTensor(logits, parent_coords))
        return h, subs, fuse_head

    def _head_rows(self, f: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """output_layer(LN_noaffine(f), eps 1e-5) for rows f [r, C], computed in the head's (fp32) dtype."""
        y = self.output_layer(F.layer_norm(f.to(self.output_layer.weight.dtype), (f.shape[1],)))
        return y.to(dtype)

    def _head(self, h: SparseTensor, dtype: torch.dtype) -> SparseTensor:
        """output_layer(LN_noaffine(h), eps 1e-5), computed in the head's (fp32) dtype over row chunks,
        returned in `dtype` (the latent's)."""
        n, c = h.feats.shape
        out = torch.empty(n, self.out_channels, dtype=dtype, device=h.feats.device)
        rows = _chunk_rows(self.chunk_size, c * 8)
        for s in range(0, n, rows):
            out[s : s + rows] = self._head_rows(h.feats[s : s + rows], dtype)
        return h.replace(out)

    def forward(
        self,
        x: SparseTensor,
        guide_subs: list[SparseTensor] | None = None,
        return_subs: bool = False,
        cache: dict | None = None,
    ):
        """x: latent SparseTensor [N0, latent_channels] -> raw output SparseTensor [N_L, out_channels] (x's dtype).

        guide_subs: subdivision logits per up-block (texture decoder; binarised with > 0; only their
        feats are read, rows in the order of that level's coordinates).
        return_subs: also return the subdivision logits per up-block, as SparseTensors at the
        coordinates of the level they subdivide.
        cache: optional dict, level index -> that level's coordinate cache (neighbour maps); filled
        here and reused by a later call on the same coordinates (e.g. the texture decoder after the
        shape decoder). Entries whose coordinates differ are rebuilt.
        """
        if return_subs and not self.pred_subdiv:
            raise ValueError("return_subs needs pred_subdiv=True")
        fuse = self.fuse_head if self.fuse_head is not None else x.feats.is_cuda
        h, subs, headed = self._run(x, guide_subs, cache, head_dtype=x.dtype if fuse else None)
        out = h if headed else self._head(h, x.dtype)
        return (out, subs) if return_subs else out

    def upsample(self, x: SparseTensor, upsample_times: int, cache: dict | None = None) -> torch.Tensor:
        """Coordinates int32 [M, 4] after `upsample_times` predicted subdivisions (pipeline: 4)."""
        if not self.pred_subdiv:
            raise ValueError("upsample needs a decoder with pred_subdiv=True")
        if not 0 <= upsample_times < len(self.blocks):
            raise ValueError(f"upsample_times must be in [0, {len(self.blocks) - 1}]")
        h, _, _ = self._run(x, None, cache, stop_level=upsample_times)
        return h.coords


class MeshInputs(NamedTuple):
    """Inputs of flexible_dual_grid_to_mesh for one batch item."""

    coords: torch.Tensor  # int32 [N, 3] voxel (x, y, z), no batch column
    vertices: torch.Tensor  # [N, 3] dual vertex in voxel units from the voxel's lower corner
    intersected: torch.Tensor  # bool [N, 3] edge flags
    quad_lerp: torch.Tensor  # [N, 1] split weight


class FlexiDualGridVaeDecoder(SparseUnetVaeDecoder):
    """Shape decoder: 7 channels per voxel -> FlexiDualGrid mesh-extraction inputs."""

    def __init__(
        self,
        resolution: int,
        model_channels: list[int],
        latent_channels: int,
        num_blocks: list[int],
        block_type: list[str],
        up_block_type: list[str],
        block_args: list[dict],
        voxel_margin: float = 0.5,
        use_fp16: bool = False,
    ):
        super().__init__(7, model_channels, latent_channels, num_blocks, block_type, up_block_type, block_args, use_fp16, pred_subdiv=True)
        self.resolution = resolution
        self.voxel_margin = voxel_margin

    def set_resolution(self, resolution: int) -> None:
        self.resolution = resolution

    def forward(self, x: SparseTensor, return_subs: bool = False, cache: dict | None = None):
        """Raw 7-channel output h (and, with return_subs, the subdivision logits); see mesh_inputs."""
        return super().forward(x, return_subs=return_subs, cache=cache)

    def mesh_inputs(self, h: SparseTensor) -> list[MeshInputs]:
        """Per batch item, the inputs of flexible_dual_grid_to_mesh, in h's dtype:
        coords int32 [N, 3] (no batch column), vertices [N, 3] = (1+2m)·sigmoid(h[:, 0:3]) − m,
        intersected bool [N, 3] = h[:, 3:6] > 0, quad_lerp [N, 1] = softplus(h[:, 6:7])."""
        f = h.feats
        vertices = (1 + 2 * self.voxel_margin) * torch.sigmoid(f[:, 0:3]) - self.voxel_margin
        intersected = f[:, 3:6] > 0
        quad_lerp = F.softplus(f[:, 6:7])
        out, start = [], 0
        for n in h.batch_counts():
            sl = slice(start, start + n)
            out.append(MeshInputs(h.coords[sl, 1:], vertices[sl], intersected[sl], quad_lerp[sl]))
            start += n
        return out

    def extract_meshes(self, h: SparseTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(vertices float32 [N, 3], faces int32 [2L, 3]) per batch item, aabb [-0.5, 0.5]³, grid self.resolution."""
        return [
            flexible_dual_grid_to_mesh(m.coords, m.vertices.float(), m.intersected, m.quad_lerp.float(), aabb=[[-0.5] * 3, [0.5] * 3], grid_size=self.resolution)
            for m in self.mesh_inputs(h)
        ]


def quantize_hr_coords(coords: torch.Tensor, r_dec: int, grid: int) -> torch.Tensor:
    """Pixal3D's LR -> HR token set: unique rows of cat(b, round((c + 0.5) / r_dec · (grid − 1))).

    coords int [M, 4] from `upsample` (resolution r_dec; the pipeline uses the literal 512), grid the
    HR latent grid. fp32 arithmetic in upstream's order, round half to even; rows sorted
    lexicographically. Returns int32 [K, 4].
    """
    q = ((coords[:, 1:] + 0.5) / r_dec * (grid - 1)).round().int()
    return torch.cat([coords[:, :1].int(), q], dim=1).unique(dim=0)
