"""Input image → the square, object-centred RGB image every conditioner sees (upstream
`Pixal3DImageTo3DPipeline.preprocess_image`, reproduced step for step; its 1.1× crop margin sets the
projection geometry, so it must not change)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputImageError

CROP_MARGIN = 1.1  # Pixal3D; TRELLIS.2 uses 1.0
MAX_SIDE = 1024
ALPHA_THRESHOLD = 0.8 * 255


def load_image(path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"{path}: image file not found")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputImageError(f"{path}: not a readable image ({e})") from None
    return img


def _with_alpha(img: Image.Image) -> Image.Image | None:
    """RGBA if the image carries transparency that is not all opaque, else None."""
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return None
    return img if not np.all(np.asarray(img)[:, :, 3] == 255) else None


def _remove_background(img: Image.Image) -> Image.Image:
    try:
        import rembg  # optional: pip install rembg
    except ImportError:
        raise InputImageError(
            "the image has no transparency (alpha channel) to separate the object from its background; "
            "give an RGBA image with the background removed, or `pip install rembg` to remove it automatically"
        ) from None
    return rembg.remove(img.convert("RGB")).convert("RGBA")


def preprocess_image(img: Image.Image, bg_color=(0, 0, 0)) -> Image.Image:
    """Alpha crop with a 1.1× square margin, composited over `bg_color`. Returns an RGB image."""
    rgba = _with_alpha(img)
    scale = min(1.0, MAX_SIDE / max(img.size))
    if scale < 1:  # upstream resizes before matting; for an RGBA input the order does not matter
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.LANCZOS)
        rgba = _with_alpha(img) if rgba is not None else None
    out = rgba if rgba is not None else _remove_background(img)
    a = np.asarray(out)[:, :, 3]
    ys_xs = np.argwhere(a > ALPHA_THRESHOLD)
    if ys_xs.size == 0:
        raise InputImageError("the image is fully transparent (no pixel with alpha > 0.8): nothing to reconstruct")
    x0, y0, x1, y1 = ys_xs[:, 1].min(), ys_xs[:, 0].min(), ys_xs[:, 1].max(), ys_xs[:, 0].max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = int(max(x1 - x0, y1 - y0) * CROP_MARGIN)
    if size < 2:
        raise InputImageError(f"the visible object is {size} pixel(s) wide: too small to reconstruct")
    out = out.crop((cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2))  # PIL pads with zeros
    arr = np.asarray(out).astype(np.float32) / 255
    rgb, alpha = arr[:, :, :3], arr[:, :, 3:4]
    bg = np.asarray(bg_color, dtype=np.float32) / 255.0
    comp = rgb * alpha + bg * (1.0 - alpha)
    return Image.fromarray((np.clip(comp, 0, 1) * 255).astype(np.uint8))


def to_tensor(img: Image.Image, size: int):
    """LANCZOS resize to the conditioner's working size, then [1,3,S,S] float32 in [0,1]."""
    import torch

    img = img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
