"""`pixal3d-rt infer` end to end on the tiny preset, and every bad input giving a clear error
with no output file left behind."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from pixal3d_rt.checkpoints import write_weights
from pixal3d_rt.cli import main
from pixal3d_rt.presets import build_preset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug.png"


def _infer(*args):
    return CliRunner().invoke(main, ["infer", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mug.glb"
    res = _infer("--image", EXAMPLE, "--output", out, "--preset", "tiny", "--seed", 7, "--device", "cpu")
    return res, out


def test_tiny_preset_writes_a_textured_pbr_glb(tiny_run):
    res, out = tiny_run
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.stat().st_size > 1000
    scene = trimesh.load(str(out))
    geoms = list(scene.geometry.values()) if isinstance(scene, trimesh.Scene) else [scene]
    assert len(geoms) == 1
    mesh = geoms[0]
    assert len(mesh.faces) > 100 and len(mesh.vertices) > 50
    assert np.isfinite(mesh.vertices).all()
    mat = mesh.visual.material
    assert isinstance(mat, trimesh.visual.material.PBRMaterial)
    assert mat.baseColorTexture is not None and mat.metallicRoughnessTexture is not None
    base = np.asarray(mat.baseColorTexture)
    assert base.ndim == 3 and base.shape[0] == base.shape[1] and np.isfinite(base).all()
    assert base[..., :3].std() > 0  # a baked texture, not a constant
    uv = mesh.visual.uv
    assert uv is not None and np.isfinite(uv).all() and uv.min() >= -1e-6 and uv.max() <= 1 + 1e-6


def test_tiny_preset_progress_and_summary(tiny_run):
    res, out = tiny_run
    text = res.output
    assert "structural demo" in text
    for stage in ("ss_flow", "shape_lr_flow", "shape_hr_flow", "tex_flow", "shape_decoder", "tex_decoder", "glb_export"):
        assert stage in text, stage
    assert "tokens: ss_flow 512" in text and "shape_hr_flow" in text
    assert "faces" in text and str(out) in text


def test_no_weights_explains_how_to_get_them(tmp_path):
    res = _infer("--image", EXAMPLE, "--output", tmp_path / "a.glb")
    assert res.exit_code == 2
    assert "huggingface-cli download TencentARC/Pixal3D" in res.output and "--preset tiny" in res.output
    assert not (tmp_path / "a.glb").exists()


def _assert_clean_failure(res, out, *needles):
    assert res.exit_code == 2, res.output
    err_lines = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1, res.output
    for n in needles:
        assert n in err_lines[0], err_lines[0]
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary left either


def test_missing_image(tmp_path):
    out = tmp_path / "a.glb"
    _assert_clean_failure(_infer("--image", tmp_path / "none.png", "--output", out, "--preset", "tiny"), out, "none.png", "not found")


def test_corrupt_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    out = tmp_path / "a.glb"
    _assert_clean_failure(_infer("--image", bad, "--output", out, "--preset", "tiny"), out, "bad.png", "not a readable image")


def test_fully_transparent_image(tmp_path):
    img = tmp_path / "clear.png"
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(img)
    out = tmp_path / "a.glb"
    _assert_clean_failure(_infer("--image", img, "--output", out, "--preset", "tiny"), out, "transparent")


def test_wrong_weights_directory(tmp_path):
    out = tmp_path / "a.glb"
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(_infer("--image", EXAMPLE, "--output", out, "--weights", tmp_path / "empty"), out, "pipeline.json", "not found")


def test_schema_mismatch(tmp_path):
    w, _ = build_preset("tiny")
    d = write_weights(w, tmp_path / "weights")
    p = d / "ckpts/shape_dec_next_dc_f16c32_fp16.safetensors"
    sd = load_file(str(p))
    key = sorted(sd)[3]
    sd[key] = torch.zeros(*[s + 1 for s in sd[key].shape])
    save_file(sd, str(p))
    out = tmp_path / "a.glb"
    _assert_clean_failure(_infer("--image", EXAMPLE, "--output", out, "--weights", d), out, "shape_dec_next_dc_f16c32_fp16.safetensors", key)


def test_output_must_be_glb(tmp_path):
    out = tmp_path / "a.obj"
    _assert_clean_failure(_infer("--image", EXAMPLE, "--output", out, "--preset", "tiny"), out, ".glb")


def test_tiny_preset_glb_passes_khronos_validator(tiny_run):
    from test_glb import _run_validator

    res, out = tiny_run
    assert res.exit_code == 0, res.output
    rc, report = _run_validator(out)
    assert report["numErrors"] == 0, report["errors"]
    assert rc == 0
