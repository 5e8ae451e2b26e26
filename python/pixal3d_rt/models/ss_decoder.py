"""Sparse-structure decoder: dense 3D-conv VAE decoder, latent [B, 8, r³] -> occupancy logits [B, 1, (4r)³].

Upstream: TRELLIS `SparseStructureDecoder` (pixal3d/models/sparse_structure_vae.py, identical in
TRELLIS.2). State-dict keys are upstream's: input_layer, middle_block.i.*, blocks.k.* (ResBlock3d or
UpsampleBlock3d), out_layer.{0,2}.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel dim of [B, C, *spatial], computed in (at least) fp32, cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.movedim(1, -1).to(torch.promote_types(x.dtype, torch.float32))
        y = F.layer_norm(y, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1).contiguous().to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in (at least) fp32, cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "group":
        return GroupNorm32(32, channels)
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    raise ValueError(f"invalid norm type {norm_type!r}")


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """out[b, c, f·h+i, f·w+j, f·d+k] = in[b, c·f³ + (i·f + j)·f + k, h, w, d]."""
    b, c, h, w, d = x.shape
    co = c // factor**3
    x = x.reshape(b, co, factor, factor, factor, h, w, d)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, co, h * factor, w * factor, d * factor)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None, norm_type: str = "layer"):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class UpsampleBlock3d(nn.Module):
    """Conv3d to 8·C' channels, then 2x pixel shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


# layers whose weights upstream keeps in fp16 when use_fp16 (norms stay fp32)
_HALF_PRECISION_LAYERS = (nn.Conv3d, nn.Linear)


def _convert_layers(module: nn.Module, dtype: torch.dtype) -> None:
    for m in module.modules():
        if isinstance(m, _HALF_PRECISION_LAYERS):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)


class SparseStructureDecoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: list[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.channels = list(channels)
        self.use_fp16 = use_fp16
        self.dtype = torch.float16 if use_fp16 else torch.float32

        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(
            *[ResBlock3d(channels[0], channels[0], norm_type) for _ in range(num_res_blocks_middle)]
        )
        blocks: list[nn.Module] = []
        for i, ch in enumerate(channels):
            blocks += [ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks)]
            if i < len(channels) - 1:
                blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(), nn.Conv3d(channels[-1], out_channels, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Torso (middle + blocks) convs in fp16; input/output layers and all norms stay fp32."""
        self.use_fp16, self.dtype = True, torch.float16
        _convert_layers(self.blocks, torch.float16)
        _convert_layers(self.middle_block, torch.float16)

    def convert_to_fp32(self) -> None:
        self.use_fp16, self.dtype = False, torch.float32
        _convert_layers(self.blocks, torch.float32)
        _convert_layers(self.middle_block, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: latent [B, latent_channels, r, r, r] -> logits [B, out_channels, 4r, 4r, 4r] (x's dtype).

        input/output layers run in their own (fp32) dtype, the torso in self.dtype, as upstream."""
        outer = self.input_layer.weight.dtype
        h = self.input_layer(x.to(outer)).to(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(outer)).to(x.dtype)


def occupancy_to_coords(logits: torch.Tensor, pool: bool = True) -> torch.Tensor:
    """Occupied cells of SS-decoder logits [B, 1, R, R, R] as int32 [M, 4] (batch, x, y, z).

    As the pipeline: occupancy = logits > 0; with pool, a 2x max-pool first (64³ -> 32³). Rows come
    out in argwhere order (batch-major, lexicographic).
    """
    occ = (logits > 0).float()
    if pool:
        occ = F.max_pool3d(occ, 2, 2, 0)
    return torch.argwhere(occ > 0.5)[:, [0, 2, 3, 4]].int()
