"""What a new user runs, the way they run it: `pixal3d-rt infer --weights W` and the Python API, each in
a fresh process, on the tiny networks written in the official layout; `pixal3d-rt check`; batches;
progress; and everything that must be refused before a network is read."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from pixal3d_rt.checkpoints import write_weights
from pixal3d_rt.presets import build_preset
from test_glb import _run_validator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mug.png"
# the console script installed beside this interpreter, as a user runs it
CLI = [shutil.which("pixal3d-rt", path=str(Path(sys.executable).parent)) or shutil.which("pixal3d-rt") or "pixal3d-rt"]


def run_cli(*args, env=None, timeout=900):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    w, _ = build_preset("tiny")
    return write_weights(w, tmp_path_factory.mktemp("weights"))


def _one_error_line(res):
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


def _mesh(path):
    scene = trimesh.load(str(path))
    return next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene


@pytest.mark.parametrize("resolution", ["512", "1024"])
def test_infer_with_weights_in_a_fresh_process(weights, tmp_path, resolution):
    """Failed before module constants named their device: they became meta tensors under checkpoint
    loading's meta context ("Cannot copy out of meta tensor")."""
    out = tmp_path / "mug.glb"
    res = run_cli("infer", "--image", EXAMPLE, "--output", out, "--weights", weights, "--resolution", resolution,
                  "--texture-size", 512, "--seed", 3, "--preview")
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.is_file()
    from PIL import Image

    with Image.open(out.with_suffix(".preview.png")) as im:  # the rendered views: not one flat colour
        assert im.size[0] > im.size[1] > 0 and len(set(im.convert("RGB").getdata())) > 10
    mesh = _mesh(out)
    assert len(mesh.faces) > 100
    textured = resolution != "512"
    assert (mesh.visual.material.baseColorTexture is not None) == textured
    rc, report = _run_validator(out)
    assert report["numErrors"] == 0 and rc == 0, report["errors"]
    # the summary: load row, stages, tokens, faces, texture, output
    assert "  load " in res.stdout and "tokens: ss" in res.stdout and f"wrote {out}" in res.stdout
    assert ("texture 512²" if textured else "texture none") in res.stdout


def test_module_constants_survive_a_meta_import():
    """Importing every module inside a meta-device context (as checkpoint loading does) leaves no
    module-level tensor on the meta device."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys, torch
        import pixal3d_rt, pixal3d_rt.kernels, pixal3d_rt.runtime
        with torch.device("meta"):
            for pkg in (pixal3d_rt, pixal3d_rt.kernels, pixal3d_rt.runtime):
                for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                    if ".tools" in m.name:
                        continue
                    importlib.import_module(m.name)
        bad = [f"{name}.{attr}" for name, mod in list(sys.modules.items()) if name.startswith("pixal3d_rt")
               for attr, v in vars(mod).items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]
        n = sum(1 for name, mod in sys.modules.items() if name.startswith("pixal3d_rt")
                for v in vars(mod).values() if isinstance(v, torch.Tensor))
        print(n, bad)
        assert n >= 4 and not bad, bad
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout


def test_python_api_in_a_fresh_process(weights, tmp_path):
    out = tmp_path / "api.glb"
    code = textwrap.dedent(f"""
        import numpy as np
        from PIL import Image
        from pixal3d_rt import Pipeline
        pipe = Pipeline.from_pretrained({str(weights)!r}, device="cpu", resolution=512)
        a = pipe.run({str(EXAMPLE)!r}, resolution=512, seed=5)
        b = pipe.run(np.asarray(Image.open({str(EXAMPLE)!r})), resolution=512, seed=5)
        assert (a.vertices == b.vertices).all() and (a.faces == b.faces).all()  # path and array: same asset
        mesh = a.to_trimesh(texture_size=256)
        stats = a.save_glb({str(out)!r}, texture_size=256)
        assert stats["faces"] == len(mesh.faces) > 100, (stats["faces"], len(mesh.faces))
        print("ok", stats["faces"])
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_mesh(out).faces) == int(res.stdout.split()[-1])
    rc, report = _run_validator(out)
    assert report["numErrors"] == 0 and rc == 0, report["errors"]


def test_public_api_is_documented():
    import pixal3d_rt
    from pixal3d_rt import Pipeline, Result

    for obj in (pixal3d_rt, Pipeline, Pipeline.from_pretrained, Pipeline.from_preset, Pipeline.run, Result,
                Result.save_glb, Result.to_trimesh):
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, obj


def test_check_reports_every_network_without_loading(weights, tmp_path):
    res = run_cli("check", "--weights", weights, "--image", EXAMPLE, "--output", tmp_path / "x.glb")
    assert res.returncode == 0, res.stderr
    for name in ("sparse_structure_flow_model", "tex_slat_decoder", "dinov3", "naf", "writable", "usable"):
        assert name in res.stdout, name
    assert not list(tmp_path.iterdir())  # the writability probe leaves nothing
    res512 = run_cli("check", "--weights", weights, "--resolution", "512")
    assert res512.returncode == 0 and "tex_slat_decoder" not in res512.stdout


def _broken_copy(weights, tmp_path, edit):
    d = tmp_path / "w"
    shutil.copytree(weights, d)
    edit(d)
    return d


def test_missing_naf_is_refused_before_loading(weights, tmp_path):
    d = _broken_copy(weights, tmp_path, lambda d: (d / "naf_release.pth").unlink())
    out = tmp_path / "a.glb"
    res = run_cli("infer", "--image", EXAMPLE, "--output", out, "--weights", d)
    assert res.returncode == 2
    assert "naf_release.pth" in _one_error_line(res)
    assert "[load]" not in res.stderr  # no network was read
    assert not out.exists()
    chk = run_cli("check", "--weights", d)
    assert chk.returncode == 2 and "naf_release.pth" in _one_error_line(chk)


def test_truncated_checkpoint_is_refused_by_check(weights, tmp_path):
    def truncate(d):
        p = d / "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16.safetensors"
        p.write_bytes(p.read_bytes()[:-100])

    d = _broken_copy(weights, tmp_path, truncate)
    res = run_cli("check", "--weights", d)
    assert res.returncode == 2 and "slat_flow_imgshape2tex_dit_1_3B_1024_bf16.safetensors" in _one_error_line(res)
    # a 512 run does not need the texture flow, so its check passes
    assert run_cli("check", "--weights", d, "--resolution", "512").returncode == 0


def test_rgb_image_without_remover_is_refused_before_loading(weights, tmp_path):
    rgb = tmp_path / "photo.jpg"
    Image.open(EXAMPLE).convert("RGB").save(rgb)
    out = tmp_path / "a.glb"
    res = run_cli("infer", "--image", rgb, "--output", out, "--weights", weights, env={"PYTHONPATH": str(_fake_rembg(tmp_path, "missing"))})
    assert res.returncode == 2
    line = _one_error_line(res)
    assert "photo.jpg" in line and "alpha" in line and "pixal3d-rt[rembg]" in line
    assert "[load]" not in res.stderr and not out.exists()


def _fake_rembg(tmp_path, behaviour):
    """A stand-in for the optional rembg package that behaves as the real one does when broken:
    "missing" hides it, "no-runtime" exits at import as rembg 2.0.86 does without onnxruntime,
    "offline" fails its model download with requests' ConnectionError."""
    d = tmp_path / f"fake-rembg-{behaviour}"
    pkg = d / "rembg"
    pkg.mkdir(parents=True, exist_ok=True)
    body = {
        "missing": "raise ImportError('No module named rembg')",
        "no-runtime": "import sys\nprint('No onnxruntime backend found. Please install rembg[cpu]')\nsys.exit(1)",
        "offline": ("class ConnectionError(OSError):\n    pass\n"
                    "def new_session(name):\n    raise ConnectionError(\"HTTPSConnectionPool(host='github.com', port=443): "
                    "Max retries exceeded with url: /danielgatis/rembg/releases/download/v0.0.0/u2net.onnx\")\n"
                    "def remove(img, session=None):\n    raise AssertionError('unreachable')"),
    }[behaviour]
    (pkg / "__init__.py").write_text(body + "\n")
    return d


@pytest.mark.parametrize("behaviour,needle", [("no-runtime", "rembg[cpu]"), ("offline", "~/.u2net")])
def test_broken_background_remover_gives_one_line(tmp_path, behaviour, needle):
    rgb = tmp_path / "photo.png"
    Image.open(EXAMPLE).convert("RGB").save(rgb)
    out = tmp_path / "a.glb"
    res = run_cli("infer", "--image", rgb, "--output", out, "--preset", "tiny",
                  env={"PYTHONPATH": str(_fake_rembg(tmp_path, behaviour))})
    assert res.returncode == 2
    line = _one_error_line(res)
    assert needle in line or "pixal3d-rt[rembg]" in line, line
    assert not out.exists()


def test_batch_folder_glob_and_a_bad_image(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(EXAMPLE, imgs / "a.png")
    shutil.copy(EXAMPLE, imgs / "b.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(EXAMPLE, extra / "c.png")
    outdir = tmp_path / "out" / "glbs"  # created on demand
    res = run_cli("infer", "--image", imgs, "--image", str(extra / "*.png"), "--output-dir", outdir, "--preset", "tiny",
                  "--resolution", "512", "--seed", 11)
    assert res.returncode == 1, res.stderr[-2000:]  # one image failed: not zero at the end
    assert sorted(p.name for p in outdir.iterdir()) == ["a.glb", "b.glb", "c.glb"]
    assert "FAILED" in res.stdout and "broken.png" in res.stdout and "3 of 4 images written" in res.stdout
    assert "Traceback" not in res.stderr
    # the networks were built once
    assert res.stderr.count("preset 'tiny'") == 1
    # each image as a run of its own: same seed, same asset
    single = tmp_path / "single.glb"
    one = run_cli("infer", "--image", extra / "c.png", "--output", single, "--preset", "tiny", "--resolution", "512", "--seed", 11)
    assert one.returncode == 0, one.stderr[-2000:]
    assert np.array_equal(_mesh(single).vertices, _mesh(outdir / "c.glb").vertices)
    assert np.array_equal(_mesh(outdir / "a.glb").vertices, _mesh(outdir / "c.glb").vertices)


def test_several_images_need_an_output_dir(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    shutil.copy(EXAMPLE, a)
    shutil.copy(EXAMPLE, b)
    res = run_cli("infer", "--image", a, "--image", b, "--output", tmp_path / "x.glb", "--preset", "tiny")
    assert res.returncode == 2 and "--output-dir" in _one_error_line(res)
    assert not (tmp_path / "x.glb").exists()


def test_progress_plain_lines_quiet_and_fov_hint(tmp_path):
    out = tmp_path / "a.glb"
    res = run_cli("infer", "--image", EXAMPLE, "--output", out, "--preset", "tiny", "--resolution", "512", "--fov", "1.5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ss_flow: step 12/12" in res.stderr and "shape_lr_flow: step 12/12" in res.stderr
    assert "\r" not in res.stderr  # not a terminal: no bars
    assert "hint: --fov 1.5 is read in degrees" in res.stderr and "--fov 85.94" in res.stderr
    radians = run_cli("infer", "--image", EXAMPLE, "--output", tmp_path / "b.glb", "--preset", "tiny", "--fov", "0.8576")
    assert radians.returncode == 2 and "--fov 49.14" in radians.stderr and not (tmp_path / "b.glb").exists()
    quiet = run_cli("infer", "--image", EXAMPLE, "--output", out, "--preset", "tiny", "--resolution", "512", "-q")
    assert quiet.returncode == 0 and quiet.stderr.strip() == ""
    assert "wrote" in quiet.stdout and "  load " in quiet.stdout


def test_progress_bars_on_a_terminal():
    from pixal3d_rt.progress import ConsoleProgress

    class Terminal:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    term = Terminal()
    p = ConsoleProgress(term)
    p.stage("ss_flow", "4096 tokens")
    for i in range(1, 13):
        p.step("ss_flow", i, 12)
    p.stage_done("ss_flow", 1.0)
    assert "12/12" in term.text and "<" in term.text and "\r" in term.text  # tqdm: count, ETA, redraws
    p.advance("load", 3 << 30, 4 << 30)
    p.advance("load", 1 << 30, 4 << 30)
    assert "4.00G/4.00G" in term.text


def test_fov_and_seed_out_of_range_give_one_line(tmp_path):
    out = tmp_path / "a.glb"
    for args in (["--fov", "nan"], ["--fov", "inf"], ["--seed", str(2**64)], ["--seed", "-1"]):
        res = run_cli("infer", "--image", EXAMPLE, "--output", out, "--preset", "tiny", *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
        assert args[0] in res.stderr
    assert not out.exists()
