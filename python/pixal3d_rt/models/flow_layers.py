"""Building blocks of the flow transformers (Pixal3D / TRELLIS.2 modulated DiT).

One definition serves the dense sparse-structure model and the sparse structured-latent models:
every block works on a token tensor `[..., C]` and a *token layout* that says how tokens map to
batch items and how attention is grouped:

* `DenseTokens`  - tokens `[B, L, C]`, every item has L tokens (the SS model's R^3 grid);
* `VarLenTokens` - tokens packed `[T, C]`, item i owns a contiguous run of rows (sparse models).

The layout supplies three operations: broadcasting a per-item vector `[B, C]` to the tokens,
self-attention within each item and cross-attention of each item's tokens to that item's context.
A compiled backend can supply its own layout (e.g. a fused varlen kernel) and reuse the blocks.

Precision follows upstream: block Linears may be bf16/fp16 (see `convert_linears_to`), LayerNorms
and QK-RMSNorms compute in fp32 and return the input dtype, RoPE rotates in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {
    "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# token layouts


class DenseTokens:
    """Tokens `[B, L, C]`; attention runs over all L tokens of an item."""

    def per_item(self, v: torch.Tensor) -> torch.Tensor:
        return v.unsqueeze(1)  # [B, C] -> [B, 1, C]

    @staticmethod
    def _sdpa(q, k, v):  # [B, Lq, H, D], [B, Lk, H, D] -> [B, Lq, H, D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def self_attention(self, q, k, v):
        return self._sdpa(q, k, v)

    def cross_attention(self, q, k, v):
        return self._sdpa(q, k, v)


class VarLenTokens:
    """Tokens packed `[T, C]`: item i owns rows `offsets[i]:offsets[i+1]` (items may differ in length).

    Attention is full attention within each item, computed with SDPA per item, which is what
    upstream's `sdpa` sparse backend does and equals flash-attn varlen.
    """

    def __init__(self, counts: list[int], device: torch.device | str | None = None):
        self.counts = [int(c) for c in counts]
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.batch_index = torch.repeat_interleave(
            torch.arange(len(self.counts), device=device), torch.tensor(self.counts, device=device)
        )

    @classmethod
    def from_sparse(cls, x) -> "VarLenTokens":
        """Layout of a `SparseTensor` (cached in its coordinate cache, shared by every forward)."""
        key = "varlen_tokens"
        if key not in x.cache:
            x.cache[key] = cls(x.batch_counts(), x.device)
        return x.cache[key]

    def per_item(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.batch_index]  # [B, C] -> [T, C]

    def _items(self):
        return [(i, self.offsets[i], self.offsets[i + 1]) for i in range(len(self.counts))]

    def self_attention(self, q, k, v):  # [T, H, D] each
        # packed [T, 3, H, D], as upstream's sparse path hands q/k/v to SDPA, so this eager path uses
        # upstream's memory and kernels (the layout alone does not change SDPA's speed on an H200)
        q, k, v = torch.stack([q, k, v], dim=1).unbind(dim=1)
        outs = []
        for _, a, b in self._items():
            qi, ki, vi = (z[a:b].transpose(0, 1).unsqueeze(0) for z in (q, k, v))  # [1, H, L, D]
            outs.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
        return torch.cat(outs, dim=0) if outs else q.new_zeros(0, *v.shape[1:])

    def cross_attention(self, q, k, v):  # q [T, H, D]; k, v [B, M, H, D] (one context per item)
        outs = []
        for i, a, b in self._items():
            qi = q[a:b].transpose(0, 1).unsqueeze(0)
            ki, vi = (z[i].transpose(0, 1).unsqueeze(0) for z in (k, v))
            outs.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
        return torch.cat(outs, dim=0) if outs else q.new_zeros(0, *v.shape[2:])


# ---------------------------------------------------------------------------------------------
# small layers


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights stay fp32), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head QK norm: L2-normalise over the head dim in fp32, times gamma[H, D] * sqrt(D)."""

    def __init__(self, head_dim: int, heads: int):
        super().__init__()
        self.scale = head_dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H, D]
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `cat[cos(t*f), sin(t*f)]`, f_k = exp(-ln(max_period) * k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


def rope_phases(coords: torch.Tensor, head_dim: int, rope_freq: tuple[float, float] = (1.0, 10000.0)) -> torch.Tensor:
    """Complex RoPE phases `[N, head_dim/2]` for integer positions `coords [N, dim]`.

    Per axis a, `freq_dim = head_dim // 2 // dim` phases exp(i * coord_a * freq_j) with
    freq_j = rope_freq[0] / rope_freq[1] ** (j / freq_dim); axes are laid out one after another and
    the remaining pairs are padded with 1 + 0i (identity rotation).
    """
    n, dim = coords.shape
    freq_dim = head_dim // 2 // dim
    freqs = rope_freq[0] / (rope_freq[1] ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim))
    angles = torch.outer(coords.reshape(-1), freqs).reshape(n, dim * freq_dim)
    phases = torch.polar(torch.ones_like(angles), angles)
    pad = head_dim // 2 - phases.shape[-1]
    if pad > 0:
        ones = torch.ones(n, pad, device=coords.device)
        phases = torch.cat([phases, torch.polar(ones, torch.zeros_like(ones))], dim=-1)
    return phases


def rope_cos_sin(phases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-valued form `(cos, sin)`, each fp32 `[N, D/2]`, of complex phases (for exporters and
    kernels that have no complex numbers; `apply_rope` accepts either form)."""
    return phases.real.float().contiguous(), phases.imag.float().contiguous()


def apply_rope(x: torch.Tensor, phases) -> torch.Tensor:
    """Rotate channel pairs (2m, 2m+1) of `x [..., N, H, D]` by `phases [N, D/2]`, in fp32.

    `phases` is complex, or a `(cos, sin)` pair of real `[N, D/2]` tensors (same rotation written
    out: (a, b) -> (a cos - b sin, a sin + b cos); ONNX/TensorRT have no complex dtype)."""
    if isinstance(phases, (tuple, list)):
        cos, sin = (p.unsqueeze(-2) for p in phases)  # [N, 1, D/2] broadcast over heads
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * phases.unsqueeze(-2)).reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# attention


class MultiHeadAttention(nn.Module):
    """Self- (`to_qkv`) or cross- (`to_q` + `to_kv`) attention with optional QK-RMSNorm and RoPE."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        type: str = "self",
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        assert channels % num_heads == 0
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.is_self = type == "self"
        ctx_channels = ctx_channels if ctx_channels is not None else channels
        if self.is_self:
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels, 2 * channels, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, layout, context: torch.Tensor | None = None,
                phases: torch.Tensor | None = None) -> torch.Tensor:
        H = self.num_heads
        if self.is_self:
            q, k, v = self.to_qkv(x).unflatten(-1, (3, H, -1)).unbind(dim=-3)  # [..., H, D] each
            if self.qk_rms_norm:
                q, k = self.q_rms_norm(q), self.k_rms_norm(k)
            if phases is not None:
                q, k = apply_rope(q, phases), apply_rope(k, phases)
            h = layout.self_attention(q, k, v)
        else:
            q = self.to_q(x).unflatten(-1, (H, -1))
            k, v = self.to_kv(context).unflatten(-1, (2, H, -1)).unbind(dim=-3)  # [B, M, H, D]
            if self.qk_rms_norm:
                q, k = self.q_rms_norm(q), self.k_rms_norm(k)
            h = layout.cross_attention(q, k, v)
        return self.to_out(h.flatten(-2))


class ProjectAttention(nn.Module):
    """Pixal3D "proj" conditioning: cross-attention to the global tokens plus a per-block linear
    map of the view-aligned per-token features (added, no gate)."""

    def __init__(self, cross_attn_block: MultiHeadAttention, channels: int, proj_in_channels: int):
        super().__init__()
        self.cross_attn_block = cross_attn_block
        self.proj_linear = nn.Linear(proj_in_channels, channels)

    def forward(self, x: torch.Tensor, layout, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        global_cond, proj_cond = context
        return self.proj_linear(proj_cond) + self.cross_attn_block(x, layout, global_cond)


class FeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated block: self-attention (gated), image conditioning (ungated), MLP (gated).

    `mod` is the shared adaLN output `[B, 6C]` (share_mod) or the time embedding `[B, C]`.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
        share_mod: bool = False,
        image_attn_mode: str = "cross",
        proj_in_channels: int | None = None,
    ):
        super().__init__()
        self.share_mod = share_mod
        self.image_attn_mode = image_attn_mode
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm)
        cross = MultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels, type="cross",
                                   qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross)
        if image_attn_mode == "proj":
            self.cross_attn = ProjectAttention(cross, channels, proj_in_channels if proj_in_channels is not None else ctx_channels)
        elif image_attn_mode == "cross":
            self.cross_attn = cross
        else:
            raise ValueError(f"image_attn_mode {image_attn_mode!r} is not supported (supported: 'proj', 'cross')")
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if share_mod:
            self.modulation = nn.Parameter(torch.randn(6 * channels) / channels ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context, layout, phases: torch.Tensor | None = None) -> torch.Tensor:
        if self.share_mod:
            m = (self.modulation + mod).type(mod.dtype)  # fp32 parameter + model-dtype mod, back to model dtype
        else:
            m = self.adaLN_modulation(mod)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.chunk(6, dim=1)  # [B, C] each
        # broadcast to the tokens at the point of use, as upstream does: `1 + scale` is formed per item
        # and a varlen layout's per-token copies are transient, never all six held across the block
        per = layout.per_item
        h = self.norm1(x) * per(1 + scale1) + per(shift1)
        x = x + self.self_attn(h, layout, phases=phases) * per(gate1)
        # context: (global, proj) in proj mode, the global tokens in cross mode
        x = x + self.cross_attn(self.norm2(x), layout, context)
        h = self.norm3(x) * per(1 + scale2) + per(shift2)
        x = x + self.mlp(h) * per(gate2)
        return x


def convert_linears_to(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of every nn.Linear under `module` (upstream's mixed-precision torso)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            for p in m.parameters():
                p.data = p.data.to(dtype)
