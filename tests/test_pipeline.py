"""Pipeline behaviour on the tiny preset beyond the 1024 CLI run: 512 (shape only), the 1536 token
cap, determinism, and that DINOv3 runs once per image size."""
import pytest
import torch
import trimesh
from dataclasses import replace

from pixal3d_rt.pipeline import Pipeline
from pixal3d_rt.preprocess import load_image
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug.png"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def image():
    return load_image(EXAMPLE)


def test_512_is_shape_only_and_exports_untextured(pipe, image, tmp_path):
    r = pipe.run(image, resolution=512, steps=2)
    assert r.voxel_attrs is None and r.voxel_coords is None
    assert r.resolution == 16 * 16  # LR grid 16 in the tiny preset, output ×16
    assert "shape_hr_flow" not in r.tokens and r.faces.shape[0] > 0
    out = tmp_path / "shape.glb"
    stats = pipe.export_glb(r, out)
    assert out.is_file() and stats["faces"] > 0
    mesh = list(trimesh.load(str(out)).geometry.values())[0]
    assert len(mesh.faces) == stats["faces"]


def test_1536_lowers_the_grid_until_below_the_token_cap(pipe, image):
    full = pipe.run(image, resolution=1536, steps=1)
    assert full.resolution == 16 * 48
    capped_geometry = replace(pipe.geometry, max_num_tokens=full.tokens["shape_hr_flow"] - 1)
    capped = Pipeline(pipe.w, geometry=capped_geometry, preset="tiny").run(image, resolution=1536, steps=1)
    # upstream lowers 1536 by 128 (here: one LR-grid quarter, ×16) while N_HR >= the cap, never below 1024
    assert capped.resolution < full.resolution and capped.resolution >= 16 * 32
    assert capped.resolution % 4 == 0
    assert capped.tokens["shape_hr_flow"] < full.tokens["shape_hr_flow"]


def test_same_seed_same_asset_other_seed_differs(pipe, image):
    a = pipe.run(image, resolution=512, steps=2, seed=3)
    b = pipe.run(image, resolution=512, steps=2, seed=3)
    c = pipe.run(image, resolution=512, steps=2, seed=4)
    assert torch.equal(a.latents["shape_slat"].feats, b.latents["shape_slat"].feats)
    assert torch.equal(a.faces, b.faces)
    assert not torch.equal(a.latents["shape_slat"].feats, c.latents["shape_slat"].feats) or a.tokens != c.tokens


def test_dinov3_runs_once_per_image_size(pipe, image, monkeypatch):
    sizes = []
    orig = pipe.conditioner.encode

    def counting(img):
        sizes.append(img.shape[-1])
        return orig(img)

    monkeypatch.setattr(pipe.conditioner, "encode", counting)
    pipe.run(image, resolution=1024, steps=1)
    assert sorted(sizes) == [pipe.geometry.lr_image, pipe.geometry.hr_image]
