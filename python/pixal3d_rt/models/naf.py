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

    def forward(self, x: torch.Tensor, row0: int = 0, total_rows: int | None = None) -> torch.Tensor:
        """x [B, C, H, W]; a band of rows row0 .. row0+H-1 of a map of `total_rows` rows (default: the
        whole map) gets the coordinates those rows have in the whole map."""
        B, C, H, W = x.shape
        n, D = self.num_heads, self.head_dim
        dev = x.device
        coords_h = torch.arange(row0 + 0.5, row0 + H, device=dev, dtype=torch.float32) / (H if total_rows is None else total_rows)
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
        """Attention output at pixels (rows, cols) of the T×T map: [B, M, C]; rows = cols = None:
        every pixel in raster order (the queries are then passed as a view, not gathered)."""
        B, _, th, tw = queries.shape
        if rows is None:
            q_sel = queries.reshape(B, self.heads_attn, -1, th * tw).permute(0, 3, 1, 2)  # [B, T·T, n, D] view
        else:
            q_sel = queries[:, :, rows, cols].permute(0, 2, 1)
        return self.attend_sel(q_sel, (th, tw), keys, features, rows, cols, max_elements)

    def attend_sel(self, q_sel, output_size, keys, features, rows, cols, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """Attention output [B, M, C] from the queries of the pixels themselves: q_sel [B, M, dim]
        (or [B, M, heads, D]) at (rows, cols) of the output_size map (rows = cols = None: all, raster)."""
        th, tw = output_size
        B, M = q_sel.shape[:2]
        ph, pw = keys.shape[-2:]
        C = features.shape[1]
        n = self.heads_attn
        if C % n != 0:
            raise ValueError(f"feature channels {C} not divisible by heads_attn {n}")
        dilation = (th // ph, tw // pw)
        dev = q_sel.device
        # heads-last LR maps; the T×T keys/values are read through the nearest-exact index maps
        k = keys.permute(0, 2, 3, 1).reshape(B, ph, pw, n, -1)
        v = features.to(q_sel.dtype).permute(0, 2, 3, 1).reshape(B, ph, pw, n, C // n)
        kv_index = (nearest_exact_index(ph, th, dev), nearest_exact_index(pw, tw, dev))
        if q_sel.dim() == 3:
            q_sel = q_sel.reshape(B, M, n, -1)
        out = na2d_at(q_sel, k, v, rows, cols, self.kernel_size, dilation, kv_index=kv_index, max_elements=max_elements)
        return out.reshape(B, M, C)

    @torch.no_grad()
    def queries_keys_at(self, image: torch.Tensor, lr_shape, output_size, rows: torch.Tensor, cols: torch.Tensor,
                        band_rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """`queries_keys` without the T×T query map: the queries only at pixels (rows, cols)
        ([B, M, dim]) and the pooled keys ([B, dim, P, P]), computed in bands of about `band_rows`
        output rows (see `_banded_encoder`). Equal to queries_keys(...)[0][:, :, rows, cols].mT
        and [1] up to fp32 rounding; peak memory O(band) instead of O(S²·dim)."""
        th, tw = (int(s) for s in output_size)
        ph, pw = (int(s) for s in lr_shape)
        enc = self.image_encoder
        Sh, Sw = image.shape[-2:]
        if not enc.use_encoder or Sh > 4 * th or Sw > 4 * tw:  # cases Pixal3D never hits: the full map
            q, k = self.queries_keys(image, (ph, pw), (th, tw))
            return q[:, :, rows, cols].permute(0, 2, 1), k
        return _banded_encoder(enc, image.to(enc.encoder[0].weight.dtype), (th, tw), (ph, pw), rows, cols, band_rows)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """[B, C, T, T] (channels_last memory layout)."""
        th, tw = (int(s) for s in output_size)
        queries, keys = self.queries_keys(image, features.shape[-2:], (th, tw))
        out = self.attend_at(queries, keys, features, None, None, max_elements)
        return out.view(out.shape[0], th, tw, -1).permute(0, 3, 1, 2)

    def forward_at(self, image, features, output_size, rows, cols, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """The output only at pixels (rows[m], cols[m]) (int64 [M]): [B, M, C] = forward(...)[:, :, rows, cols].mT."""
        th, tw = (int(s) for s in output_size)
        queries, keys = self.queries_keys(image, features.shape[-2:], (th, tw))
        rows = rows.to(queries.device, torch.long)
        cols = cols.to(queries.device, torch.long)
        return self.attend_at(queries, keys, features, rows, cols, max_elements)


# ---- banded evaluation of the image encoder (the lazy NAF map's queries and keys) -------------------
#
# The encoder is convolutions (reflect padding) and GroupNorms: a band of output rows needs its input
# rows plus one halo row per 3×3 conv, and each GroupNorm needs the statistics of its whole input.
# Pass k (k = 0 .. #GN-1) runs the bands up to the k-th GroupNorm's input and accumulates its
# per-(batch, group) sums (fp64); the last pass runs the whole encoder band by band, pools each band
# to its output rows, applies RoPE with the rows' global coordinates, pools the keys and picks the
# requested pixels. Bands of the last pass are whole LR-cell rows, so every pooling window lies inside
# one band.


def _encoder_ops(seq: nn.Sequential) -> list:
    ops = [("conv", seq[0])]
    for blk in seq[1:]:
        ops += [("gn", blk.norm1), ("silu", None), ("conv", blk.conv1), ("gn", blk.norm2), ("silu", None), ("conv", blk.conv2)]
    return ops


def _run_rows(ops, x: torch.Tensor, r0: int, r1: int, stats: list) -> torch.Tensor:
    """ops applied to image x [B, 3, S, W], rows r0..r1-1 of the result (stats: (mean, rstd) per GN)."""
    S = x.shape[2]
    halo = sum(m.padding[0] for kind, m in ops if kind == "conv")
    a, b = max(0, r0 - halo), min(S, r1 + halo)
    y = x[:, :, a:b]
    gn = 0
    for kind, m in ops:
        if kind == "conv":
            p = m.padding[0]
            if p:  # reflect padding across the width, and at the image's own top/bottom rows only
                y = F.pad(y, (p, p, p if a == 0 else 0, p if b == S else 0), mode="reflect")
                a, b = (a if a == 0 else a + p), (b if b == S else b - p)
            y = F.conv2d(y, m.weight, m.bias)
        elif kind == "gn":
            mean, rstd = stats[gn]
            gn += 1
            Bn, C = y.shape[:2]
            yf = y.float().reshape(Bn, m.num_groups, -1, *y.shape[2:])
            yf = (yf - mean[:, :, None, None, None]) * rstd[:, :, None, None, None]
            y = (yf.reshape(y.shape) * m.weight.float()[:, None, None] + m.bias.float()[:, None, None]).to(y.dtype)
        else:
            y = F.silu(y)
    return y[:, :, r0 - a : r1 - a]


def _pool_rows(x: torch.Tensor, in_start: int, in_total: int, out_start: int, out_end: int, out_total: int, out_cols: int) -> torch.Tensor:
    """Rows out_start..out_end-1 (and all out_cols columns) of adaptive_avg_pool2d over a map of
    in_total rows, from x = its rows in_start.. (exactly those the windows cover)."""
    if in_total % out_total == 0:  # aligned windows: torch's own op on the band, same windows
        return F.adaptive_avg_pool2d(x, (out_end - out_start, out_cols))
    xc = F.adaptive_avg_pool2d(x, (x.shape[2], out_cols))
    rows = []
    for i in range(out_start, out_end):
        s, e = (i * in_total) // out_total, -(-(i + 1) * in_total // out_total)
        rows.append(xc[:, :, s - in_start : e - in_start].mean(dim=2, keepdim=True))
    return torch.cat(rows, dim=2)


def _window_start(i: int, n_in: int, n_out: int) -> int:
    return (i * n_in) // n_out


def _window_end(i: int, n_in: int, n_out: int) -> int:
    return -(-(i + 1) * n_in // n_out)


def _banded_encoder(enc: NAFImageEncoder, x: torch.Tensor, out_size, lr_shape, rows, cols, band_rows: int):
    th, tw = out_size
    ph, pw = lr_shape
    B, _, S, _ = x.shape
    dev = x.device
    branches = [_encoder_ops(enc.encoder), _encoder_ops(enc.sem_encoder)]
    gn_pos = [[i for i, (kind, _) in enumerate(ops) if kind == "gn"] for ops in branches]
    stats = [[] for _ in branches]
    stat_band = max(2, band_rows * S // th)
    for k in range(max(len(p) for p in gn_pos)):
        acc = [None] * len(branches)
        for r0 in range(0, S, stat_band):
            r1 = min(S, r0 + stat_band)
            for bi, ops in enumerate(branches):
                if k >= len(gn_pos[bi]):
                    continue
                G = ops[gn_pos[bi][k]][1].num_groups
                y = _run_rows(ops[: gn_pos[bi][k]], x, r0, r1, stats[bi]).float().reshape(B, G, -1)
                part = torch.stack([y.sum(-1, dtype=torch.float64), (y * y).sum(-1, dtype=torch.float64)])
                acc[bi] = part if acc[bi] is None else acc[bi] + part
        for bi, ops in enumerate(branches):
            if k >= len(gn_pos[bi]):
                continue
            norm = ops[gn_pos[bi][k]][1]
            n = S * x.shape[3] * (norm.num_channels // norm.num_groups)
            mean = acc[bi][0] / n
            var = (acc[bi][1] / n - mean * mean).clamp_min(0)
            stats[bi].append((mean.float(), torch.rsqrt(var + norm.eps).float()))

    rows = rows.to(dev, torch.long)
    cols = cols.to(dev, torch.long)
    M = rows.numel()
    dim = sum(ops[-1][1].out_channels for ops in branches)
    q_sel = torch.empty(B, M, dim, dtype=x.dtype, device=dev)
    keys = torch.empty(B, dim, ph, pw, dtype=x.dtype, device=dev)
    order = torch.argsort(rows)
    lr_step = max(1, band_rows * ph // th)
    bands = []
    for p0 in range(0, ph, lr_step):
        p1 = min(ph, p0 + lr_step)
        t0, t1 = _window_start(p0, th, ph), _window_end(p1 - 1, th, ph)
        bands.append((p0, p1, t0, t1))
    bounds = torch.searchsorted(rows[order], torch.tensor([[t0, t1] for *_, t0, t1 in bands], device=dev)).tolist()
    for (p0, p1, t0, t1), (lo, hi) in zip(bands, bounds):
        s0, s1 = _window_start(t0, S, th), _window_end(t1 - 1, S, th)
        feats = torch.cat([_run_rows(ops, x, s0, s1, stats[bi]) for bi, ops in enumerate(branches)], dim=1)
        qb = enc.rope(_pool_rows(feats, s0, S, t0, t1, th, tw), row0=t0, total_rows=th)
        del feats
        keys[:, :, p0:p1] = _pool_rows(qb, t0, th, p0, p1, ph, pw)
        if hi > lo:
            idx = order[lo:hi]
            q_sel[:, idx] = qb[:, :, rows[idx] - t0, cols[idx]].permute(0, 2, 1)
    return q_sel, keys


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
