"""NAF feature upsampler (valeoai/NAF), natten-free (golden README §2.3, pixal3d.md §3).

    hr = NAF(...)(image [B,3,S,S] in [0,1], lr_features [B,C,P,P], (T,T)) -> [B,C,T,T]

Eval-mode semantics of upstream `src/model/naf.py`:
  queries = RoPE(adaptive_avg_pool(cat(encoder(img), sem_encoder(img)), T))      [B, dim, T, T]
  keys    = nearest-exact_T(adaptive_avg_pool(queries, P))
  values  = nearest-exact_T(lr_features)
  out     = na2d(queries, keys, values, kernel 9, dilation T//P), heads split "b (n d) h w"
The upsampled keys and values are never materialised: neighbourhood attention reads the pooled
maps through the nearest-exact index maps (a pure copy, so this is exact), and `forward_at`
evaluates only selected output pixels.

State-dict keys are upstream's (`image_encoder.{encoder,sem_encoder}.*`, `image_encoder.rope.periods`);
`load_naf_pth` reads the release `naf_release.pth` (a plain state_dict) with weights_only=True.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixal3d_rt.kernels.na2d import DEFAULT_MAX_ELEMENTS, na2d_at


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 (for fp16/bf16 weights), output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class EncBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv (reflect padding). NAF builds it without residual."""

    def __init__(self, channels: int, kernel_size: int, num_groups: int = 8):
        super().__init__()
        pad = kernel_size // 2
        self.norm1 = GroupNorm32(num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=pad, padding_mode="reflect")
        self.norm2 = GroupNorm32(num_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=pad, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(x)))


def conv_encoder(in_channels: int, channels: int, kernel_size: int, num_layers: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect"),
        *[EncBlock(channels, kernel_size) for _ in range(num_layers)],
    )


class AxialRoPE(nn.Module):
    """DINOv3-style axial RoPE over a [B, heads*D, H, W] map (eval: no coordinate augmentation).

    Coordinates 2·(arange(0.5, n)/n) − 1 per axis (u = row, v = column); per head of size D,
    angle = 2π·coord/period with periods = base^(2·arange(D/4)/(D/2)), laid out [u(D/4), v(D/4)]
    and tiled ×2; x·cos + rotate_half(x)·sin with rotate_half(x) = [−x[D/2:], x[:D/2]].
    """

    def __init__(self, dim: int, num_heads: int, base: float = 100.0):
        super().__init__()
        if dim % (4 * num_heads) != 0:
            raise ValueError(f"RoPE needs dim divisible by 4*heads, got dim={dim}, heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        q = self.head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(q, dtype=torch.float32) / (self.head_dim // 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        n, D = self.num_heads, self.head_dim
        dev = x.device
        coords_h = torch.arange(0.5, H, device=dev, dtype=torch.float32) / H
        coords_w = torch.arange(0.5, W, device=dev, dtype=torch.float32) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0  # [HW, 2]
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # [HW, 2, D/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, D]
        cos, sin = torch.cos(angles), torch.sin(angles)
        t = x.float().reshape(B, n, D, H * W).transpose(-1, -2)  # [B, n, HW, D]
        rot = torch.cat([-t[..., D // 2:], t[..., : D // 2]], dim=-1)
        t = t * cos + rot * sin
        return t.transpose(-1, -2).reshape(B, C, H, W).to(x.dtype)


class NAFImageEncoder(nn.Module):
    def __init__(self, in_channels: int, dim: int, heads_rope: int, use_encoder: bool, rope_base: float, img_layers: int):
        super().__init__()
        self.use_encoder = use_encoder
        self.encoder = conv_encoder(in_channels, dim // 2, 1, img_layers)
        self.sem_encoder = conv_encoder(in_channels, dim // 2, 3, img_layers)
        self.rope = AxialRoPE(dim, heads_rope, rope_base)

    def forward(self, image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        th, tw = output_size
        x = image.to(self.encoder[0].weight.dtype)
        # upstream bounds the encoder cost: a guide larger than 4x the output is bilinearly shrunk first
        if x.shape[-2] > 4 * th or x.shape[-1] > 4 * tw:
            size = (min(x.shape[-2], 4 * th, 4 * tw), min(x.shape[-1], 4 * tw, 4 * th))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if self.use_encoder:
            x = torch.cat([self.encoder(x), self.sem_encoder(x)], dim=1)
        x = F.adaptive_avg_pool2d(x, output_size=(th, tw))
        return self.rope(x)


def nearest_exact_index(in_size: int, out_size: int, device=None) -> torch.Tensor:
    """Source index of each output position of F.interpolate(mode="nearest-exact"), int64 [out_size].

    Obtained from torch's own kernel on an arange, so it is its exact index rule on that device.
    """
    src = torch.arange(in_size, dtype=torch.float32, device=device).view(1, 1, in_size, 1)
    return F.interpolate(src, size=(out_size, 1), mode="nearest-exact").view(out_size).long()


class NAF(nn.Module):
    def __init__(
        self,
        dim: int = 256,
        heads_attn: int = 4,
        heads_rope: int = 4,
        kernel_size: int = 9,
        use_encoder: bool = True,
        rope_base: float = 100.0,
        rope_rescale: float = 2.0,  # training-time coordinate augmentation only; unused in eval
        img_layers: int = 2,
        **kwargs,  # upstream's constructor swallows extra arguments too
    ):
        super().__init__()
        if dim % heads_attn != 0:
            raise ValueError(f"dim {dim} not divisible by heads_attn {heads_attn}")
        self.dim = dim
        self.heads_attn = heads_attn
        self.kernel_size = (kernel_size, kernel_size)
        self.rope_rescale = rope_rescale
        self.image_encoder = NAFImageEncoder(3, dim, heads_rope, use_encoder, rope_base, img_layers)

    def queries_keys(self, image: torch.Tensor, lr_shape: tuple[int, int], output_size) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, dim, T, T] (encoder map after RoPE) and pooled keys [B, dim, P, P]."""
        q = self.image_encoder(image, tuple(int(s) for s in output_size))
        return q, F.adaptive_avg_pool2d(q, output_size=tuple(lr_shape))

    def attend_at(self, queries, keys, features, rows, cols, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """Attention output at pixels (rows, cols) of the T×T map: [B, M, C]."""
        B, _, th, tw = queries.shape
        ph, pw = keys.shape[-2:]
        C = features.shape[1]
        n = self.heads_attn
        if C % n != 0:
            raise ValueError(f"feature channels {C} not divisible by heads_attn {n}")
        dilation = (th // ph, tw // pw)
        dev = queries.device
        # heads-last LR maps; the T×T keys/values are read through the nearest-exact index maps
        k = keys.permute(0, 2, 3, 1).reshape(B, ph, pw, n, -1)
        v = features.to(queries.dtype).permute(0, 2, 3, 1).reshape(B, ph, pw, n, C // n)
        kv_index = (nearest_exact_index(ph, th, dev), nearest_exact_index(pw, tw, dev))
        q_sel = queries[:, :, rows, cols].permute(0, 2, 1).reshape(B, rows.numel(), n, -1)
        out = na2d_at(q_sel, k, v, rows, cols, self.kernel_size, dilation, kv_index=kv_index, max_elements=max_elements)
        return out.reshape(B, rows.numel(), C)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """[B, C, T, T] (channels_last memory layout)."""
        th, tw = (int(s) for s in output_size)
        queries, keys = self.queries_keys(image, features.shape[-2:], (th, tw))
        dev = queries.device
        rows = torch.arange(th, device=dev).repeat_interleave(tw)
        cols = torch.arange(tw, device=dev).repeat(th)
        out = self.attend_at(queries, keys, features, rows, cols, max_elements)
        return out.view(out.shape[0], th, tw, -1).permute(0, 3, 1, 2)

    def forward_at(self, image, features, output_size, rows, cols, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """The output only at pixels (rows[m], cols[m]) (int64 [M]): [B, M, C] = forward(...)[:, :, rows, cols].mT."""
        th, tw = (int(s) for s in output_size)
        queries, keys = self.queries_keys(image, features.shape[-2:], (th, tw))
        rows = rows.to(queries.device, torch.long)
        cols = cols.to(queries.device, torch.long)
        return self.attend_at(queries, keys, features, rows, cols, max_elements)


def load_naf_pth(path, map_location="cpu", **config) -> NAF:
    """NAF from the release checkpoint (`naf_release.pth`): a plain state_dict at the top level
    (upstream hubconf: `model.load_state_dict(load_state_dict_from_url(...))`), read without pickle
    execution. `config` overrides the hubconf defaults (NAF())."""
    sd = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a flat state_dict of tensors")
    model = NAF(**config)
    model.load_state_dict(sd, strict=True)
    return model.eval()
