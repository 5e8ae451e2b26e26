"""DINOv3 ViT image encoder (transformers `DINOv3ViTModel`) and Pixal3D's token extraction.

The network is transformers' own class (its state_dict is the checkpoint's; 415 tensors for
ViT-L/16). What Pixal3D computes differs from `DINOv3ViTModel.forward` in one place: upstream's
`extract_features` runs embeddings -> RoPE -> the layers and then a NON-affine
`F.layer_norm(eps=1e-5)`, leaving the trained final `norm` unused, whereas `forward` applies that
trained norm (affine, config eps). So `extract_tokens` drives the same submodules directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig, DINOv3ViTModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _config_args(config: dict) -> dict:
    """Accept a plain args dict, a checkpoint-style {"name", "args"} dict, or an HF config.json dict."""
    args = config.get("args", config) if isinstance(config, dict) else config
    return {k: v for k, v in args.items() if k not in ("name", "architectures", "model_type", "transformers_version", "torch_dtype")}


def build_dinov3(config: dict, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None) -> DINOv3ViTModel:
    """DINOv3ViTModel from a config dict (random init; load weights afterwards). Eval mode, frozen."""
    cfg = DINOv3ViTConfig(**_config_args(config))
    cfg._attn_implementation = attn_implementation
    model = DINOv3ViTModel(cfg)
    if dtype is not None:
        model.to(dtype)
    model.eval().requires_grad_(False)
    return model


def extract_tokens(model: DINOv3ViTModel, image: torch.Tensor) -> torch.Tensor:
    """Pixal3D's DINOv3 tokens: image [B,3,S,S] in [0,1] -> [B, 1 + registers + P², C] (fp32).

    ImageNet normalisation (x − mean)/std (torchvision Normalize's arithmetic), embeddings, RoPE,
    the layers, then a non-affine layer norm (eps 1e-5), computed in fp32.
    """
    dtype = model.embeddings.patch_embeddings.weight.dtype
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    x = ((image - mean) / std).to(dtype)
    h = model.embeddings(x, bool_masked_pos=None)
    rope = model.rope_embeddings(x)
    layers = model.layer if hasattr(model, "layer") else model.model.layer  # transformers 4.x / 5.x
    for layer in layers:
        h = layer(h, position_embeddings=rope)
    return F.layer_norm(h.float(), h.shape[-1:], eps=1e-5)


def split_tokens(tokens: torch.Tensor, num_register_tokens: int, patch_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, 1+R+Ph·Pw, C] -> global tokens [B, 1+R, C] (CLS + registers) and the patch map
    [B, C, Ph, Pw] (rows = image y, columns = image x)."""
    B, _, C = tokens.shape
    ph, pw = patch_hw
    g = 1 + num_register_tokens
    if tokens.shape[1] != g + ph * pw:
        raise ValueError(f"{tokens.shape[1]} tokens, expected {g} + {ph}*{pw}")
    patch_map = tokens[:, g:].reshape(B, ph, pw, C).permute(0, 3, 1, 2)
    return tokens[:, :g], patch_map
