"""Embedded presets: every network at small dimensions with seeded random weights, built in memory.

`tiny` runs the whole pipeline (image → GLB) on a CPU in well under a minute. Its asset is
structurally valid (real mesh, real baked PBR textures) but meaningless: the weights are random.
Random weights follow the golden fixtures' convention (matrices N(0, 1/fan_in), norm gains
1 + N(0, 0.2), other vectors N(0, 0.2)), so no layer is zero the way upstream initialises some.
A few output biases are then calibrated (deterministically) so that occupancy and subdivision keep a
small, stable number of voxels: random decoders would otherwise occupy half of every grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import config as C
from .checkpoints import Weights
from .models.registry import build_model
from .models.sparse import SparseTensor

LATENT = 8  # latent channels of the tiny cascade (32 at full size)
DINO_HIDDEN = 32

TINY_DINO = {
    "hidden_size": DINO_HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "patch_size": 16, "num_channels": 3, "image_size": 96, "num_register_tokens": 4, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "layerscale_value": 1.0, "drop_path_rate": 0.0, "use_gated_mlp": False,
    "rope_theta": 100.0, "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True,
    "mlp_bias": True, "attention_dropout": 0.0, "pos_embed_shift": None, "pos_embed_jitter": None,
    "pos_embed_rescale": 2.0,
}


def _flow(name, resolution, cin, cout, proj_in=None):
    args = {"resolution": resolution, "in_channels": cin, "out_channels": cout, "model_channels": 64,
            "cond_channels": DINO_HIDDEN, "num_blocks": 2, "num_heads": 4, "mlp_ratio": 5.3334, "pe_mode": "rope",
            "share_mod": True, "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True,
            "image_attn_mode": "proj", "dtype": "float32"}
    if proj_in:
        args["proj_in_channels"] = proj_in
    return {"name": name, "args": args}


def _sc_decoder(name, **extra):
    args = {"model_channels": [32, 16, 8, 8, 8], "latent_channels": LATENT, "num_blocks": [1, 1, 1, 1, 0],
            "block_type": ["SparseConvNeXtBlock3d"] * 5, "up_block_type": ["SparseResBlockC2S3d"] * 4,
            "block_args": [{"use_checkpoint": False}] * 5, "use_fp16": False, **extra}
    return {"name": name, "args": args}


TINY_CONFIGS = {
    "sparse_structure_flow_model": _flow("SparseStructureFlowModel", 8, 8, 8),
    "sparse_structure_decoder": {"name": "SparseStructureDecoder", "args": {
        "out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "num_res_blocks_middle": 1,
        "channels": [16, 16, 8], "use_fp16": False}},
    "shape_slat_flow_model_512": _flow("SLatFlowModel", 16, LATENT, LATENT, 2 * DINO_HIDDEN),
    "shape_slat_flow_model_1024": _flow("SLatFlowModel", 32, LATENT, LATENT, 2 * DINO_HIDDEN),
    "tex_slat_flow_model_1024": _flow("SLatFlowModel", 32, 2 * LATENT, LATENT, 2 * DINO_HIDDEN),
    "shape_slat_decoder": _sc_decoder("FlexiDualGridVaeDecoder", resolution=256),
    "tex_slat_decoder": _sc_decoder("SparseUnetVaeDecoder", out_channels=6, pred_subdiv=False),
}
TINY_NAF = {"name": "NAF", "args": {"dim": 32, "heads_attn": 4, "heads_rope": 4, "kernel_size": 5, "use_encoder": True,
                                    "rope_base": 100.0, "rope_rescale": 2.0, "img_layers": 2}}
# DINOv3 at 96/192 px gives 6×6 / 12×12 patch maps; NAF's 5×5 window at dilation 16 then fits (k·d ≤ T)
TINY_GEOMETRY = C.Geometry(lr_image=96, hr_image=192, max_num_tokens=4000)


def init_kind(name: str, p: torch.Tensor) -> str:
    """Which random law a parameter gets: "matrix" N(0, 1/fan_in), "gain" 1 + N(0, 0.2), "vector" N(0, 0.2)."""
    if p.dim() >= 2:
        return "matrix"
    if name.endswith(("norm.weight", "gamma", "lambda1", "lambda", "norm1.weight", "norm2.weight")) or ".norm" in name and name.endswith("weight"):
        return "gain"
    return "vector"


def randomize_(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """The golden fixtures' random-parameter convention, applied in state_dict order."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            kind = init_kind(name, p)
            if kind == "matrix":
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif kind == "gain":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module


def _calibrate_occupancy(ss_dec: nn.Module, latent_res: int, gen: torch.Generator, target: float = 0.1) -> None:
    """Shift the SS decoder's output bias so that about `target` of the pooled grid is occupied."""
    from .models.ss_decoder import occupancy_to_coords

    out_conv = [m for m in ss_dec.modules() if isinstance(m, nn.Conv3d)][-1]
    z = torch.randn(1, 8, latent_res, latent_res, latent_res, generator=gen)
    with torch.no_grad():
        logits = ss_dec(z)
        pooled = torch.nn.functional.max_pool3d(logits, 2, 2, 0).flatten()
        thr = torch.quantile(pooled, 1 - target)
        out_conv.bias -= thr + 1e-3
        assert occupancy_to_coords(ss_dec(z)).shape[0] > 0


def _calibrate_subdivision(dec: nn.Module, latent_res: int, gen: torch.Generator, keep: float = 0.25) -> None:
    """Shift each predicted-subdivision bias so that about `keep` of the 8 children survive per level."""
    heads = [m for n, m in dec.named_modules() if n.endswith("to_subdiv") and isinstance(m, nn.Linear)]
    n = 64
    idx = torch.randperm(latent_res ** 3, generator=gen)[:n].sort().values
    xyz = torch.stack([idx // latent_res ** 2, (idx // latent_res) % latent_res, idx % latent_res], 1)
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.long), xyz], 1).int()
    x = SparseTensor(torch.randn(n, LATENT, generator=gen), coords)
    for i, head in enumerate(heads):
        captured = {}
        hook = head.register_forward_hook(lambda mod, inp, out: captured.setdefault("logits", out.detach().clone()))
        with torch.no_grad():
            dec.upsample(x, upsample_times=i + 1)
        hook.remove()
        thr = torch.quantile(captured["logits"].float().flatten(), 1 - keep)
        with torch.no_grad():
            head.bias -= thr + 1e-3


PRESETS = ("tiny", "reference")


def preset_structure(name: str):
    """The structure source a preset gives its Pipeline (see Pipeline.structure), or None."""
    if name == "reference":
        from .reference_shape import ReferenceStructure

        return ReferenceStructure()
    return None


def pipeline_args(latent: int, gen: torch.Generator) -> dict:
    """pipeline.json's args for a preset: upstream's samplers, random latent normalisations."""
    norm = lambda: {"mean": (0.1 * torch.randn(latent, generator=gen)).tolist(),
                    "std": (0.5 + torch.rand(latent, generator=gen)).tolist()}
    return {
        "sparse_structure_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": C.SIGMA_MIN},
                                     "params": {"guidance_interval": C.GUIDANCE_INTERVALS["sparse_structure"]}},
        "shape_slat_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": C.SIGMA_MIN},
                               "params": {"guidance_interval": C.GUIDANCE_INTERVALS["shape_slat"]}},
        "tex_slat_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": C.SIGMA_MIN},
                             "params": {"guidance_interval": C.GUIDANCE_INTERVALS["tex_slat"]}},
        "shape_slat_normalization": norm(),
        "tex_slat_normalization": norm(),
        "default_pipeline_type": "1024_cascade",
    }


def build_preset(name: str, device="cpu", seed: int = 0) -> tuple[Weights, C.Geometry]:
    if name == "reference":
        from .reference_preset import build_reference

        return build_reference(device=device, seed=seed)
    if name != "tiny":
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    gen = torch.Generator().manual_seed(seed)
    models = {}
    for key, cfg in TINY_CONFIGS.items():
        models[key] = randomize_(build_model(cfg), gen).eval()
    _calibrate_occupancy(models["sparse_structure_decoder"], TINY_CONFIGS["sparse_structure_flow_model"]["args"]["resolution"], gen)
    lr_grid = TINY_CONFIGS["shape_slat_flow_model_512"]["args"]["resolution"]
    _calibrate_subdivision(models["shape_slat_decoder"], lr_grid, gen)

    dcfg = DINOv3ViTConfig(**TINY_DINO)
    dcfg._attn_implementation = "sdpa"
    dino = DINOv3ViTModel(dcfg)
    randomize_(dino, gen).eval()
    naf = randomize_(build_model(TINY_NAF), gen).eval()
    args = pipeline_args(LATENT, gen)
    for mod in [*models.values(), dino, naf]:
        mod.to(device)
    w = Weights(models, dict(TINY_CONFIGS), dino, dcfg.to_dict(), naf, TINY_NAF, args, source=f"preset:{name}")
    return w, TINY_GEOMETRY
