"""The `reference` preset: every network at full size (the official configs) with seeded random
weights, and the structure of a reference object (reference_shape.py) in place of what random weights
would decide. It runs every stage at the token and voxel counts of a real object, for benchmarks; its
assets do not depict the image.

Weights are drawn on the device they run on (a seeded generator there, in each parameter's own
dtype: bf16 flow blocks, fp16 decoder torsos, as the official checkpoints load on a GPU), so the
~6.8 B parameters take seconds, not the minutes of a CPU draw and copy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import config as C
from .checkpoints import NAF_DEFAULT_CONFIG, Weights, compute_config
from .models.registry import build_model
from .presets import init_kind, pipeline_args

LATENT = 32


def _flow(name, resolution, cin, cout, proj=True):
    args = {"resolution": resolution, "in_channels": cin, "out_channels": cout, "model_channels": 1536,
            "cond_channels": 1024, "num_blocks": 30, "num_heads": 12, "mlp_ratio": 5.3334, "pe_mode": "rope",
            "share_mod": True, "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True,
            "image_attn_mode": "proj"}
    if proj:
        args["proj_in_channels"] = 2048
    return {"name": name, "args": {**args, "dtype": "bfloat16"}}


def _decoder(name, **extra):
    args = {"model_channels": [1024, 512, 256, 128, 64], "latent_channels": LATENT, "num_blocks": [4, 16, 8, 4, 0],
            "block_type": ["SparseConvNeXtBlock3d"] * 5, "up_block_type": ["SparseResBlockC2S3d"] * 4,
            "block_args": [{"use_checkpoint": False}] * 3 + [{"use_checkpoint": True}] * 2, "use_fp16": True}
    return {"name": name, "args": {**extra.pop("first", {}), **args, **extra}}


# the official ckpts/*.json (TencentARC/Pixal3D; the SS decoder from microsoft/TRELLIS-image-large)
REFERENCE_CONFIGS = {
    "sparse_structure_flow_model": _flow("SparseStructureFlowModel", 16, 8, 8, proj=False),
    "sparse_structure_decoder": {"name": "SparseStructureDecoder", "args": {
        "out_channels": 1, "latent_channels": 8, "num_res_blocks": 2, "num_res_blocks_middle": 2,
        "channels": [512, 128, 32], "use_fp16": True}},
    "shape_slat_flow_model_512": _flow("SLatFlowModel", 32, LATENT, LATENT),
    "shape_slat_flow_model_1024": _flow("SLatFlowModel", 64, LATENT, LATENT),
    "tex_slat_flow_model_1024": _flow("SLatFlowModel", 64, 2 * LATENT, LATENT),
    "shape_slat_decoder": _decoder("FlexiDualGridVaeDecoder", first={"resolution": 256}),
    "tex_slat_decoder": _decoder("SparseUnetVaeDecoder", first={"out_channels": 6}, pred_subdiv=False),
}
# DINOv3 ViT-L/16 (camenduru/dinov3-vitl16-pretrain-lvd1689m config.json)
REFERENCE_DINO = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "patch_size": 16, "num_channels": 3, "image_size": 224, "num_register_tokens": 4, "hidden_act": "gelu",
    "layer_norm_eps": 1e-05, "layerscale_value": 1.0, "drop_path_rate": 0.0, "use_gated_mlp": False,
    "rope_theta": 100.0, "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True,
    "mlp_bias": True, "attention_dropout": 0.0, "pos_embed_shift": None, "pos_embed_jitter": None,
    "pos_embed_rescale": 2.0,
}
REFERENCE_NAF = NAF_DEFAULT_CONFIG


def randomize_on_device_(module: nn.Module, gen: torch.Generator | None) -> nn.Module:
    """presets.randomize_'s laws, drawn where each parameter lives (gen None: meta, nothing to draw)."""
    if gen is None:
        return module
    with torch.no_grad():
        for name, p in module.named_parameters():
            kind = init_kind(name, p)
            if kind == "matrix":
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
            elif kind == "gain":
                p.normal_(1.0, 0.2, generator=gen)
            else:
                p.normal_(0.0, 0.2, generator=gen)
    return module


def build_reference(device="cpu", seed: int = 0) -> tuple[Weights, C.Geometry]:
    """(Weights, geometry) of the reference preset on `device` ("meta" builds shapes only). On a CPU
    the networks are fp32 (as from_pretrained loads them there), about 27 GB."""
    from .models.dinov3 import build_dinov3

    device = torch.device(device)
    gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    dtype = "float32" if device.type == "cpu" else None
    models, configs = {}, {}
    for key, cfg in REFERENCE_CONFIGS.items():
        configs[key] = cfg
        with torch.device(device):
            models[key] = randomize_on_device_(build_model(compute_config(cfg, dtype)), gen).eval().requires_grad_(False)
    with torch.device(device):
        dino = randomize_on_device_(build_dinov3(REFERENCE_DINO), gen)
        naf = randomize_on_device_(build_model(REFERENCE_NAF), gen).eval().requires_grad_(False)
    args = pipeline_args(LATENT, torch.Generator().manual_seed(seed))
    w = Weights(models, configs, dino, dino.config.to_dict(), naf, REFERENCE_NAF, args, source="preset:reference")
    return w, C.FULL
