"""Input image → the square, object-centred RGB image every conditioner sees (upstream
`Pixal3DImageTo3DPipeline.preprocess_image`, reproduced step for step; its 1.1× crop margin sets the
projection geometry, so it must not change)."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputImageError, first_line

CROP_MARGIN = 1.1  # Pixal3D; TRELLIS.2 uses 1.0
MAX_SIDE = 1024
ALPHA_THRESHOLD = 0.8 * 255
MAX_PIXELS = 64_000_000  # larger inputs are refused before decoding (`--max-image-pixels` raises it)
REMBG_INSTALL = "pip install 'pixal3d-rt[rembg]' (CPU) or 'pixal3d-rt[rembg-gpu]'"


def load_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and decode an image file into RGB or RGBA (8 bits per channel); its size is checked from
    the header before decoding. Anything unreadable raises InputImageError."""
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"{path}: image file not found")
    too_many = f"more than the limit of {max_pixels:,} pixels (raise it with --max-image-pixels N if the file is trusted)"
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the header's size is checked here, with our message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise InputImageError(f"{path}: {img.width}×{img.height} pixels is {too_many}")
                Image.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)  # decoders that find larger frames (GIF, ICO, TIFF tiles) stop at our limit
                img.load()
                return _eight_bit(img)
    except InputImageError:
        raise
    except Image.DecompressionBombError as e:
        raise InputImageError(f"{path}: {too_many} ({first_line(e)})") from None
    except Exception as e:  # decoders of untrusted bytes raise many types (OSError, ValueError, SyntaxError, struct.error, ...)
        raise InputImageError(f"{path}: not a readable image ({first_line(e)}); give a PNG, JPEG, WebP, BMP or TIFF "
                              "file") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _eight_bit(img: Image.Image) -> Image.Image:
    """RGBA when the image carries transparency, else RGB; 16-bit and float greys are scaled, not clipped."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = a.max() if a.size else 0.0
        if img.mode == "F" and top <= 1.0:  # float images in [0, 1]
            a = a * 255
        elif img.mode.startswith("I;16") or top > 255:  # 16-bit
            a = a / 257
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))  # mode L
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


def as_image(image) -> Image.Image:
    """A path, a PIL image, or an HxW, HxWx3 or HxWx4 uint8 array (RGB/RGBA)."""
    if isinstance(image, Image.Image):
        try:
            return _eight_bit(image)
        except Exception as e:  # a pixel mode PIL cannot convert
            raise InputImageError(f"image of mode {image.mode}: cannot be converted to RGB(A) ({first_line(e)})") from None
    if isinstance(image, (str, Path)):
        return load_image(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputImageError(f"image array of shape {arr.shape} and dtype {arr.dtype}: expected HxWx3 or HxWx4 uint8")
    return Image.fromarray(arr)


def needs_background_removal(img: Image.Image) -> bool:
    return _with_alpha(img) is None


def check_image(img: Image.Image, what: str = "image") -> None:
    """Everything `preprocess_image` would reject, checked up front: an RGB image needs a working
    background remover (its model is fetched here, on first use); an RGBA one a visible object."""
    if needs_background_removal(img):
        _rembg_session(what)
    else:
        _crop_box(np.asarray(_with_alpha(img))[:, :, 3], what)


def _with_alpha(img: Image.Image) -> Image.Image | None:
    """RGBA if the image carries transparency that is not all opaque, else None."""
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return None
    return img if not np.all(np.asarray(img)[:, :, 3] == 255) else None


@functools.lru_cache(maxsize=1)
def _rembg_model():
    """rembg's session, made once per process (its first use downloads the u2net model, ~170 MB)."""
    try:
        import rembg
    except ImportError:
        raise InputImageError(None) from None
    except SystemExit:  # rembg exits at import when installed without its onnxruntime flavour
        raise InputImageError(f"rembg is installed without its runtime; install it with {REMBG_INSTALL}") from None
    try:
        return rembg, rembg.new_session("u2net")
    except Exception as e:  # network errors of its model download, a corrupt model file, ...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputImageError(f"rembg could not load its background-removal model u2net ({type(e).__name__}: {msg}); "
                              "it is downloaded into ~/.u2net on first use: connect once, or copy u2net.onnx there") from None


def _rembg_session(what: str = "the image"):
    try:
        return _rembg_model()
    except InputImageError as e:
        if e.args[0] is None:
            raise InputImageError(
                f"{what}: no transparency (alpha channel) separates the object from its background; give an RGBA "
                f"image with the background removed, or install background removal: {REMBG_INSTALL}") from None
        raise


def _remove_background(img: Image.Image) -> Image.Image:
    rembg, session = _rembg_session()
    try:
        return rembg.remove(img.convert("RGB"), session=session).convert("RGBA")
    except Exception as e:
        raise InputImageError(f"rembg failed on the image ({type(e).__name__}: {str(e)[:160]})") from None


def _crop_box(alpha: np.ndarray, what: str = "the image"):
    ys_xs = np.argwhere(alpha > ALPHA_THRESHOLD)
    if ys_xs.size == 0:
        raise InputImageError(f"{what} is fully transparent (no pixel with alpha > 0.8): nothing to reconstruct")
    x0, y0, x1, y1 = ys_xs[:, 1].min(), ys_xs[:, 0].min(), ys_xs[:, 1].max(), ys_xs[:, 0].max()
    size = int(max(x1 - x0, y1 - y0) * CROP_MARGIN)
    if size < 2:
        raise InputImageError(f"the visible object in {what} is {size} pixel(s) wide: too small to reconstruct")
    return (x0 + x1) / 2, (y0 + y1) / 2, size


def preprocess_image(img: Image.Image, bg_color=(0, 0, 0)) -> Image.Image:
    """Alpha crop with a 1.1× square margin, composited over `bg_color`. Returns an RGB image."""
    rgba = _with_alpha(img)
    scale = min(1.0, MAX_SIDE / max(img.size))
    if scale < 1:  # upstream resizes before matting; for an RGBA input the order does not matter
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.LANCZOS)
        rgba = _with_alpha(img) if rgba is not None else None
    out = rgba if rgba is not None else _remove_background(img)
    cx, cy, size = _crop_box(np.asarray(out)[:, :, 3])
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
