"""Exportable views of the stage networks: `forward(*spec inputs) -> spec outputs`, plain tensors only.

Each wrapper calls the network's own modules (`forward_tokens` of the flows, the decoder's
`forward`, `extract_tokens` of DINOv3): only the tensor plumbing differs from the eager call.
The sparse flows see one batch item's tokens `[B, N, C]` (B = the CFG halves over the same
coordinates, so attention groups are the B rows: the dense token layout) and RoPE as real
`(cos, sin)`. `eager_outputs` computes the same outputs through the untouched eager path
(SparseTensor, varlen layout, complex RoPE) as the reference the exported artifacts are checked
against; `example_inputs` draws valid inputs (integer voxel coordinates for the RoPE tables).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pixal3d_rt.models.dinov3 import extract_tokens
from pixal3d_rt.models.flow_layers import DenseTokens, rope_cos_sin, rope_phases
from pixal3d_rt.models.sparse import SparseTensor

from pixal3d_rt.runtime.specs import ExportSpec


class DenseFlowExport(nn.Module):
    """SS flow: x [B,Cin,R,R,R], t [B], cond_global [B,M,Cc], cond_proj [B,R³,Cp] -> velocity [B,Cout,R,R,R]."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow
        cos, sin = rope_cos_sin(flow.rope_phases)  # the grid is fixed: constants of the engine
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, t, cond_global, cond_proj):
        f = self.flow
        B, R = x.shape[0], f.resolution
        h = x.reshape(B, f.in_channels, R ** 3).transpose(1, 2)
        h = f.forward_tokens(h, t, f._context((cond_global, cond_proj)), DenseTokens(), (self.rope_cos, self.rope_sin))
        return h.transpose(1, 2).reshape(B, f.out_channels, R, R, R)


class SparseFlowExport(nn.Module):
    """Sparse flow on one item's N tokens: x [B,N,Cx], t [B], cond_global [B,M,Cc], cond_proj [B,N,Cp],
    rope_cos/rope_sin [N,D/2] (, concat_cond [B,N,Cs]) -> velocity [B,N,Cout]."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x, t, cond_global, cond_proj, rope_cos, rope_sin, concat_cond=None):
        f = self.flow
        feats = x if concat_cond is None else torch.cat([x, concat_cond], dim=-1)
        return f.forward_tokens(feats, t, f._context((cond_global, cond_proj)), DenseTokens(), (rope_cos, rope_sin))


class DinoExport(nn.Module):
    """image [1,3,S,S] in [0,1] -> Pixal3D's DINOv3 tokens [1, 1+registers+P², C] fp32."""

    def __init__(self, dino: nn.Module):
        super().__init__()
        self.dino = dino

    def forward(self, image):
        return extract_tokens(self.dino, image)


def export_module(spec: ExportSpec, network: nn.Module) -> nn.Module:
    wrap = {"dense_flow": DenseFlowExport, "sparse_flow": SparseFlowExport, "dinov3": DinoExport}.get(spec.kind)
    return (wrap(network) if wrap else network).eval()


# ---------------------------------------------------------------------------------------------
# inputs and the eager reference


def random_coords(n: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct voxels of a grid³, lexicographically sorted, as int32 [n, 4] (batch 0, x, y, z)."""
    idx = torch.randperm(grid ** 3, generator=gen)[:n].sort().values
    xyz = torch.stack([idx // grid ** 2, (idx // grid) % grid, idx % grid], dim=1)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), xyz], dim=1).int()


def rope_inputs(coords: torch.Tensor, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cos, rope_sin [N, head_dim/2] fp32 of voxel coordinates [N, 4] (the engines' RoPE inputs)."""
    return rope_cos_sin(rope_phases(coords[:, 1:], int(meta["head_dim"]), tuple(meta["rope_freq"])))


def example_inputs(spec: ExportSpec, dims: dict, gen: torch.Generator, coords: torch.Tensor | None = None) -> tuple[dict, torch.Tensor | None]:
    """Random inputs of the spec at `dims` (t in the model's 0..1000 range, images in [0, 1]);
    for sparse flows also the voxel coordinates the RoPE inputs were computed from."""
    shapes = spec.input_shapes(dims)
    inputs = {}
    for t in spec.inputs:
        if t.name == "t":
            inputs[t.name] = 1000 * torch.rand(shapes[t.name], generator=gen)
        elif t.name == "image":
            inputs[t.name] = torch.rand(shapes[t.name], generator=gen)
        elif t.name not in ("rope_cos", "rope_sin"):
            inputs[t.name] = torch.randn(shapes[t.name], generator=gen)
    if spec.kind == "sparse_flow":
        if coords is None:
            # HR stages run on a grid up to 1.5x the config's resolution (1536 cascade)
            grid = int(spec.meta["resolution"])
            n = int(dims["N"])
            while grid ** 3 < n:
                grid += 1
            coords = random_coords(n, grid, gen)
        inputs["rope_cos"], inputs["rope_sin"] = rope_inputs(coords, spec.meta)
    return inputs, coords


@torch.no_grad()
def eager_outputs(spec: ExportSpec, network: nn.Module, inputs: dict, coords: torch.Tensor | None = None) -> dict:
    """The spec's outputs computed by the eager path the pipeline runs (the reference for parity)."""
    if spec.kind == "dense_flow":
        out = network(inputs["x"], inputs["t"], {"global": inputs["cond_global"], "proj": inputs["cond_proj"]})
    elif spec.kind == "sparse_flow":
        outs = []
        for b in range(inputs["x"].shape[0]):  # each CFG half as its own call, as the sampler does
            x = SparseTensor(inputs["x"][b], coords)
            cond = {"global": inputs["cond_global"][b:b + 1], "proj": SparseTensor(inputs["cond_proj"][b], coords)}
            cc = SparseTensor(inputs["concat_cond"][b], coords) if "concat_cond" in inputs else None
            outs.append(network(x, inputs["t"][b:b + 1], cond, concat_cond=cc).feats)
        out = torch.stack(outs)
    elif spec.kind == "ss_decoder":
        out = network(inputs["latent"])
    elif spec.kind == "dinov3":
        out = extract_tokens(network, inputs["image"])
    else:
        raise ValueError(f"unknown spec kind {spec.kind!r}")
    return {spec.outputs[0].name: out.float()}
