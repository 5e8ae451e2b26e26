"""Preprocessing reproduces upstream's crop exactly and rejects unusable images clearly."""
import numpy as np
import pytest
from PIL import Image

from pixal3d_rt.errors import InputImageError
from pixal3d_rt.preprocess import load_image, preprocess_image, to_tensor


def _rgba(w, h, box, color=(200, 100, 50)):
    a = np.zeros((h, w, 4), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1, :3] = color
    a[y0:y1, x0:x1, 3] = 255
    return Image.fromarray(a, "RGBA")


def test_crop_is_square_with_1_1_margin_and_centred():
    img = _rgba(300, 200, (50, 40, 150, 120))  # bbox x 50..149, y 40..119 -> max side 99
    out = preprocess_image(img)
    assert out.mode == "RGB"
    assert out.size == (int(99 * 1.1) // 2 * 2, int(99 * 1.1) // 2 * 2)
    arr = np.asarray(out)
    # object colour in the middle, black (composited background) in the corners
    assert tuple(arr[arr.shape[0] // 2, arr.shape[1] // 2]) == (200, 100, 50)
    assert tuple(arr[0, 0]) == (0, 0, 0)


def test_crop_matches_upstream_formula():
    rng = np.random.default_rng(3)
    a = np.zeros((137, 211, 4), np.uint8)
    a[20:97, 31:170, :3] = rng.integers(0, 255, (77, 139, 3))
    a[20:97, 31:170, 3] = rng.integers(210, 256, (77, 139))
    img = Image.fromarray(a, "RGBA")
    out = np.asarray(preprocess_image(img)).astype(np.float32)
    # upstream: bbox of alpha > 0.8*255, centre, int(size*1.1), crop (PIL pads), composite over black
    ys, xs = np.nonzero(a[:, :, 3] > 0.8 * 255)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    size = int(max(xs.max() - xs.min(), ys.max() - ys.min()) * 1.1)
    crop = np.asarray(img.crop((cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2))).astype(np.float32) / 255
    want = (np.clip(crop[:, :, :3] * crop[:, :, 3:], 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(out.astype(np.uint8), want)


def test_large_image_is_downscaled_first():
    img = _rgba(2400, 1200, (1000, 300, 1600, 900))
    out = preprocess_image(img)
    assert max(out.size) <= int(600 * 1024 / 2400 * 1.1) + 2


def test_fully_transparent_is_rejected():
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 3] = 10  # transparent but not all-opaque
    with pytest.raises(InputImageError, match="fully transparent"):
        preprocess_image(Image.fromarray(a, "RGBA"))


def test_rgb_without_rembg_gives_clear_error():
    try:
        import rembg  # noqa: F401
        pytest.skip("rembg installed: RGB images are matted automatically")
    except ImportError:
        pass
    with pytest.raises(InputImageError, match="alpha channel"):
        preprocess_image(Image.new("RGB", (64, 64), (120, 30, 30)))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputImageError, match="not a readable image"):
        load_image(bad)


def test_to_tensor_range_and_shape():
    t = to_tensor(Image.new("RGB", (50, 70), (255, 0, 128)), 32)
    assert t.shape == (1, 3, 32, 32) and t.dtype.is_floating_point
    assert abs(float(t[0, 0].mean()) - 1.0) < 1e-6 and float(t[0, 1].max()) == 0.0
