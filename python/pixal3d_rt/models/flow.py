"""The Pixal3D flow transformers (velocity predictors of the three generation stages).

* `SparseStructureFlowModel` - dense DiT over the R^3 latent grid of the sparse structure (stage 1).
* `SLatFlowModel` / `ElasticSLatFlowModel` - the same DiT over sparse tokens (shape and texture
  stages); the Elastic variant only adds training-time memory management upstream, so at
  inference the two are identical.

Both run the blocks of `flow_layers.py`: tokens -> input Linear -> N modulated blocks (self-attn
with QK-RMSNorm + 3D RoPE, Pixal3D projection conditioning, MLP) -> LayerNorm -> output Linear.
Constructor arguments and state_dict keys are upstream's, so official checkpoints load strictly.

Precision (upstream convention): `dtype` ("bfloat16" in the released configs) is the dtype of the
block Linears and of the activations inside the blocks. The time embedder, adaLN, input and output
layers, LayerNorm/RMSNorm weights and the per-block `modulation` stay fp32. `convert_to(dtype)`
re-targets a built (or loaded) model, e.g. to float32 for CPU or parity runs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flow_layers import (
    DenseTokens,
    ModulatedTransformerCrossBlock,
    TimestepEmbedder,
    VarLenTokens,
    convert_linears_to,
    rope_phases,
    to_dtype,
)
from .sparse import SparseTensor


class _FlowTransformer(nn.Module):
    """Layers shared by the dense and the sparse flow model (registration order = upstream key order)."""

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        pe_mode: str = "ape",
        rope_freq: tuple[float, float] = (1.0, 10000.0),
        dtype: str | torch.dtype = "float32",
        use_checkpoint: bool = False,  # training-only (activation checkpointing); inference ignores it
        share_mod: bool = False,
        initialization: str = "vanilla",  # training-only init scheme; weights come from checkpoints
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        image_attn_mode: str = "cross",
        proj_in_channels: int | None = None,
        vae_in_channels: int | None = None,  # only used by upstream's "gated_proj" mode
        **kwargs,
    ):
        super().__init__()
        if pe_mode != "rope":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (the Pixal3D / TRELLIS.2 flows use 'rope')")
        self.resolution = resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.head_dim = model_channels // self.num_heads
        self.mlp_ratio = mlp_ratio
        self.pe_mode = pe_mode
        self.rope_freq = tuple(float(f) for f in rope_freq)
        self.share_mod = share_mod
        self.initialization = initialization
        self.image_attn_mode = image_attn_mode
        self.proj_in_channels = proj_in_channels
        self.dtype = to_dtype(dtype)

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(
                model_channels,
                cond_channels,
                num_heads=self.num_heads,
                mlp_ratio=mlp_ratio,
                qk_rms_norm=qk_rms_norm,
                qk_rms_norm_cross=qk_rms_norm_cross,
                share_mod=share_mod,
                image_attn_mode=image_attn_mode,
                proj_in_channels=proj_in_channels,
            )
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels)
        self.convert_to(self.dtype)

    def convert_to(self, dtype: str | torch.dtype) -> "_FlowTransformer":
        """Set the torso dtype: block Linears and in-block activations (upstream `convert_to`)."""
        self.dtype = to_dtype(dtype)
        convert_linears_to(self.blocks, self.dtype)
        return self

    def time_modulation(self, t: torch.Tensor) -> torch.Tensor:
        """`[B]` model time (1000*t) -> shared adaLN output `[B, 6C]` (or t_emb `[B, C]`), in the torso dtype."""
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        return t_emb.to(self.dtype)

    def _context(self, cond, proj_feats=lambda p: p):
        """Upstream accepts `{'global', 'proj'}` or a `(global, proj)` tuple in proj mode."""
        if self.image_attn_mode == "proj":
            global_cond, proj_cond = (cond["global"], cond["proj"]) if isinstance(cond, dict) else cond
            return global_cond.to(self.dtype), proj_feats(proj_cond).to(self.dtype)
        return cond.to(self.dtype)

    def run_blocks(self, h: torch.Tensor, mod: torch.Tensor, context, layout, phases: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, mod, context, layout, phases)
        return h

    def output(self, h: torch.Tensor) -> torch.Tensor:
        # F.layer_norm with its default eps 1e-5 (not the blocks' 1e-6), in fp32
        h = h.float()
        return self.out_layer(F.layer_norm(h, h.shape[-1:]))

    def forward_tokens(self, feats: torch.Tensor, t: torch.Tensor, context, layout, phases) -> torch.Tensor:
        """Token-level velocity: input features `[..., Cin]` -> `[..., Cout]` fp32, for any token
        layout and RoPE phases (complex, or a `(cos, sin)` pair as exported engines take them)."""
        h = self.input_layer(feats).to(self.dtype)
        h = self.run_blocks(h, self.time_modulation(t), context, layout, phases)
        return self.output(h)


class SparseStructureFlowModel(_FlowTransformer):
    """Dense DiT over the R^3 grid: `forward(x [B,Cin,R,R,R], t [B], cond) -> [B,Cout,R,R,R]` fp32.

    `cond` (proj mode): `{'global': [B,M,Cc], 'proj': [B,R^3,Cp]}` with proj tokens in the order
    `k = (i*R + j)*R + l` over (x, y, z) = (i, j, l), i.e. `x.view(B, C, R^3)`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = torch.arange(self.resolution)
        grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
        # complex64 [R^3, head_dim/2]; stored in the official checkpoint, so it is a persistent buffer
        self.register_buffer("rope_phases", rope_phases(grid, self.head_dim, self.rope_freq))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        B, R = x.shape[0], self.resolution
        if tuple(x.shape[1:]) != (self.in_channels, R, R, R):
            raise ValueError(f"SparseStructureFlowModel: input {tuple(x.shape)}, expected [B, {self.in_channels}, {R}, {R}, {R}]")
        h = x.reshape(B, self.in_channels, -1).transpose(1, 2)  # [B, R^3, Cin]
        h = self.forward_tokens(h, t, self._context(cond), DenseTokens(), self.rope_phases)  # [B, R^3, Cout]
        return h.transpose(1, 2).reshape(B, self.out_channels, R, R, R)


class SLatFlowModel(_FlowTransformer):
    """Sparse-token DiT: `forward(x: SparseTensor [N,Cx], t [B], cond, concat_cond=None) -> SparseTensor [N,Cout]` fp32.

    `cond` (proj mode): `{'global': [B,M,Cc], 'proj': SparseTensor or Tensor [N,Cp]}` with proj rows
    aligned with x's rows. `concat_cond` (texture stage) is appended after x's channels. Attention is
    full attention within each batch item; items may have different token counts.
    """

    def token_phases(self, x: SparseTensor) -> torch.Tensor:
        """RoPE phases of x's coordinates, cached with the coordinates (constant over the sampling loop)."""
        key = f"rope_phases_hd{self.head_dim}_freq{self.rope_freq[0]}-{self.rope_freq[1]}"
        if key not in x.cache:
            x.cache[key] = rope_phases(x.coords[:, 1:], self.head_dim, self.rope_freq)
        return x.cache[key]

    def forward(self, x: SparseTensor, t: torch.Tensor, cond, concat_cond: SparseTensor | torch.Tensor | None = None, **kwargs) -> SparseTensor:
        feats = x.feats
        if concat_cond is not None:  # x first, the condition second (rows aligned with x)
            extra = concat_cond.feats if isinstance(concat_cond, SparseTensor) else concat_cond
            feats = torch.cat([feats, extra], dim=-1)
        context = self._context(cond, proj_feats=lambda p: p.feats if isinstance(p, SparseTensor) else p)
        return x.replace(self.forward_tokens(feats, t, context, VarLenTokens.from_sparse(x), self.token_phases(x)))


class ElasticSLatFlowModel(SLatFlowModel):
    """Upstream's training-memory variant of `SLatFlowModel`; identical at inference."""
