"""`--weights TencentARC/Pixal3D`: the tiny preset's networks written as real files and placed in a
Hugging Face cache laid out as huggingface_hub lays it out (blobs named by sha256 / git sha1,
snapshots of relative links, refs/main), NAF in torch's hub cache, HF_HUB_OFFLINE=1. Nothing of
huggingface_hub or of the loader is mocked: the real code reads the real cache."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixal3d_rt import hub
from pixal3d_rt.checkpoints import CKPT_NAMES, check_weights, locate_weights, resolve_model_ref, weight_files_from_dir, write_weights
from pixal3d_rt.errors import CheckpointError
from pixal3d_rt.presets import build_preset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mug.png"
PIXAL3D, TRELLIS, DINOV3 = "TencentARC/Pixal3D", "microsoft/TRELLIS-image-large", "camenduru/dinov3-vitl16-pretrain-lvd1689m"
LFS_SUFFIXES = (".safetensors", ".pth", ".bin")


def _commit(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def _put(cache: Path, repo: str, rel: str, data: bytes) -> Path:
    """One file as huggingface_hub stores it: LFS files under their sha256, small ones under their git blob sha1."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    h = (hashlib.sha256(data) if rel.endswith(LFS_SUFFIXES) else hashlib.sha1(b"blob %d\0" % len(data) + data)).hexdigest()
    blob = folder / "blobs" / h
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / _commit(repo) / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(_commit(repo))
    return link


def _build_caches(weights_dir: Path, root: Path) -> tuple[Path, Path]:
    hf, torch_home = root / "hf", root / "torch"
    _put(hf, PIXAL3D, "pipeline.json", (weights_dir / "pipeline.json").read_bytes())
    for ref in CKPT_NAMES.values():
        base = resolve_model_ref(weights_dir, ref)
        repo, path = (TRELLIS, ref[len(TRELLIS) + 1:]) if ref.startswith(TRELLIS + "/") else (PIXAL3D, ref)
        for ext in (".json", ".safetensors"):
            _put(hf, repo, path + ext, (base.parent / (base.name + ext)).read_bytes())
    for name in ("config.json", "model.safetensors"):
        _put(hf, DINOV3, name, (weights_dir / "dinov3-vitl16-pretrain-lvd1689m" / name).read_bytes())
    ckpts = torch_home / "hub" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(weights_dir / "naf_release.pth", ckpts)
    shutil.copy(weights_dir / "naf_release.json", ckpts)  # the tiny NAF is not the released architecture
    return hf, torch_home


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")[0]


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("hubcache")
    written = write_weights(tiny, root / "written")
    return _build_caches(written, root)


def _env(hf: Path, torch_home: Path, xdg: Path) -> dict:
    return {"HF_HUB_CACHE": str(hf), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(torch_home), "XDG_CACHE_HOME": str(xdg),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture
def offline(caches, tmp_path, monkeypatch):
    """The shared caches, offline (read only by these tests)."""
    hf, torch_home = caches
    for k, v in _env(hf, torch_home, tmp_path / "xdg").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HOME", raising=False)
    return hf, torch_home


@pytest.fixture
def own_caches(caches, tmp_path, monkeypatch):
    """A copy of the caches that a test may break."""
    hf, torch_home = tmp_path / "hf", tmp_path / "torch"
    shutil.copytree(caches[0], hf, symlinks=True)
    shutil.copytree(caches[1], torch_home)
    for k, v in _env(hf, torch_home, tmp_path / "xdg").items():
        monkeypatch.setenv(k, v)
    return hf, torch_home


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def test_cache_is_laid_out_as_huggingface_hub_reads_it(caches):
    from huggingface_hub import hf_hub_download, scan_cache_dir

    hf, _ = caches
    p = Path(hf_hub_download(TRELLIS, "ckpts/ss_dec_conv3d_16l8_fp16.json", cache_dir=str(hf), local_files_only=True))
    assert p.is_symlink() and _commit(TRELLIS) in p.parts and json.loads(p.read_text())["name"] == "SparseStructureDecoder"
    info = scan_cache_dir(hf)
    assert not info.warnings
    assert {r.repo_id for r in info.repos} == {PIXAL3D, TRELLIS, DINOV3}
    assert all(set(r.refs) == {"main"} for r in info.repos)


def test_hub_id_locates_checks_and_loads_from_the_cache(offline, tiny):
    hf, torch_home = offline
    files = locate_weights(PIXAL3D)
    assert files.source == PIXAL3D
    assert str(files.pipeline_json).startswith(str(hf / "models--TencentARC--Pixal3D" / "snapshots"))
    ss = files.models["sparse_structure_decoder"]
    assert ss.parent.parent.parent.parent.name == "models--microsoft--TRELLIS-image-large", ss  # the repository pipeline.json names
    assert str(files.dinov3_dir).startswith(str(hf / "models--camenduru--dinov3-vitl16-pretrain-lvd1689m"))
    assert files.naf == torch_home / "hub" / "checkpoints" / "naf_release.pth"
    rows = check_weights(files)
    assert len(rows) == 9
    # need limits what is fetched: a 512 run takes no texture network
    assert set(locate_weights(PIXAL3D, need={"sparse_structure_decoder"}).models) == {"sparse_structure_decoder"}


def test_pipeline_from_hub_id_runs(offline, tiny):
    from pixal3d_rt.pipeline import Pipeline
    from pixal3d_rt.preprocess import load_image

    pipe = Pipeline.from_pretrained(PIXAL3D, device="cpu", resolution=512)
    got = pipe.models["shape_slat_decoder"].state_dict()
    for k, v in tiny.models["shape_slat_decoder"].state_dict().items():
        assert torch.equal(got[k].float(), v.float()), k
    result = pipe.run(load_image(EXAMPLE), resolution=512, seed=1, steps=1)
    assert result.faces.shape[0] > 0


def test_offline_missing_file_names_it_and_the_download_command(own_caches):
    hf, torch_home = own_caches
    snap = hf / "models--TencentARC--Pixal3D" / "snapshots" / _commit(PIXAL3D)
    (snap / "ckpts" / "shape_dec_next_dc_f16c32_fp16.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        locate_weights(PIXAL3D)
    msg = _one_line(e)
    assert "TencentARC/Pixal3D/ckpts/shape_dec_next_dc_f16c32_fp16.safetensors" in msg and "pixal3d-rt download" in msg
    assert "HF_HUB_OFFLINE" in msg
    # the other repositories and NAF are reported the same way
    shutil.rmtree(hf / "models--microsoft--TRELLIS-image-large")
    with pytest.raises(CheckpointError) as e:
        locate_weights(PIXAL3D, need={"sparse_structure_decoder"})
    assert "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.json" in _one_line(e)
    (torch_home / "hub" / "checkpoints" / "naf_release.pth").unlink()
    with pytest.raises(CheckpointError) as e:
        locate_weights(PIXAL3D, need={"sparse_structure_flow_model"})
    msg = _one_line(e)
    assert "naf_release.pth" in msg and "pixal3d-rt download" in msg


def _blob_of(hf: Path, repo: str, rel: str) -> Path:
    return Path(os.path.realpath(hf / ("models--" + repo.replace("/", "--")) / "snapshots" / _commit(repo) / rel))


@pytest.mark.parametrize("damage", ["flip", "truncate", "json"])
def test_corrupt_blob_names_the_blob_to_delete(own_caches, damage):
    hf, _ = own_caches
    locate_weights(PIXAL3D)  # verified once: the damage below must still be seen
    rel = "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16" + (".json" if damage == "json" else ".safetensors")
    blob = _blob_of(hf, PIXAL3D, rel)
    data = bytearray(blob.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    else:  # same size, a few bytes changed (tensor data, or the config)
        at = len(data) - 50 if damage == "flip" else data.index(b"}") - 1
        data[at:at + 4] = bytes(b ^ 0x5A for b in data[at:at + 4]) if damage == "flip" else b"    "
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        locate_weights(PIXAL3D)
    msg = _one_line(e)
    assert f"delete {blob} and run again" in msg and "corrupt download" in msg and rel in msg
    assert ("sha256" in msg) if damage == "flip" else True
    blob.unlink()  # as told; offline the file is then missing (online it would be downloaded again)
    with pytest.raises(CheckpointError, match="pixal3d-rt download"):
        locate_weights(PIXAL3D)


def test_second_run_hashes_nothing(offline, monkeypatch):
    from pixal3d_rt import files as files_mod

    hashed = []
    real = files_mod.sha256_file
    monkeypatch.setattr(files_mod, "sha256_file", lambda p, *a, **k: hashed.append(Path(p)) or real(p, *a, **k))
    hub.resolve(PIXAL3D)
    first = list(hashed)
    assert len(first) == 8  # 7 networks + DINOv3 (LFS blobs: sha256); the small files are checked by git sha1
    memo = json.loads(hub.verified_json().read_text())
    assert {str(p) for p in first} <= set(memo) and len(memo) == 8 + 9  # and 7 configs, pipeline.json, DINOv3 config.json
    hashed.clear()
    messages = []
    hub.resolve(PIXAL3D, progress=messages.append)
    assert hashed == [] and not any("verifying" in m for m in messages)


def test_ref_to_another_repository_is_resolved_generally(offline):
    assert hub.split_ref(PIXAL3D, "ckpts/x") == (PIXAL3D, "ckpts/x", None)
    assert hub.split_ref(PIXAL3D, "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16", "main") == (
        TRELLIS, "ckpts/ss_dec_conv3d_16l8_fp16", None)
    assert hub.is_hub_id(PIXAL3D) and not hub.is_hub_id("a/b/c") and not hub.is_hub_id("/abs/dir")


def _run(args, env_extra, cwd, timeout=300):
    env = {**os.environ, **env_extra}
    env.pop("HF_HOME", None)
    return subprocess.run([sys.executable, "-m", "pixal3d_rt.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_download_dir_in_a_fresh_process_is_a_weights_directory(caches, tmp_path):
    hf, torch_home = caches
    w = tmp_path / "W"
    r = _run(["download", "--dir", str(w)], _env(hf, torch_home, tmp_path / "xdg"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"--weights {w}" in r.stdout
    files = weight_files_from_dir(w)
    assert len(check_weights(files)) == 9
    assert (w / "ckpts" / "ss_dec_conv3d_16l8_fp16.safetensors").is_file() and (w / "naf_release.pth").is_file()
    assert not any(p.is_symlink() for p in w.rglob("*"))  # a directory to copy elsewhere: files, not links into the cache
    cached = _blob_of(hf, DINOV3, "model.safetensors")
    assert (w / "dinov3-vitl16-pretrain-lvd1689m" / "model.safetensors").read_bytes() == cached.read_bytes()


def test_download_again_and_into_the_cache_only(own_caches, tmp_path):
    from click.testing import CliRunner

    from pixal3d_rt.cli import main

    w = tmp_path / "W"
    hub.download(PIXAL3D, w)
    before = {p: p.stat().st_ino for p in w.rglob("*") if p.is_file()}
    files = hub.download(PIXAL3D, w)  # idempotent: nothing rewritten
    assert {p: p.stat().st_ino for p in w.rglob("*") if p.is_file()} == before and files.source == str(w)
    r = CliRunner().invoke(main, ["download", "-q"])
    assert r.exit_code == 0, r.output
    assert "--weights TencentARC/Pixal3D" in r.output and "HF_HUB_OFFLINE=1" in r.output
    (own_caches[1] / "hub" / "checkpoints" / "naf_release.pth").unlink()
    r = CliRunner().invoke(main, ["download", "--dir", str(tmp_path / "W2")])
    assert r.exit_code == 2 and "naf_release.pth" in r.output and "pixal3d-rt download" in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1


def test_infer_with_a_hub_id_offline_writes_a_glb(caches, tmp_path):
    import trimesh

    hf, torch_home = caches
    out = tmp_path / "out.glb"
    r = _run(["infer", "--image", str(EXAMPLE), "--output", str(out), "--weights", PIXAL3D, "--resolution", "512",
              "--texture-size", "256", "--steps", "1", "--device", "cpu", "-q"], _env(hf, torch_home, tmp_path / "xdg"), tmp_path)
    assert r.returncode == 0, r.stderr
    mesh = trimesh.load(out, force="mesh")
    assert len(mesh.faces) > 0


def test_readme_python_example_runs_as_written(caches, tmp_path):
    """README's Python API block, unchanged, against a Hugging Face cache holding the tiny networks."""
    import re

    import trimesh

    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Python API\n.*?^```python\n(.*?)^```", text, re.S | re.M).group(1)
    assert "Pipeline.from_pretrained(\"TencentARC/Pixal3D\")" in block and len(block.strip().splitlines()) <= 7
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "examples")
    script = tmp_path / "example.py"
    script.write_text(block + "\nprint(len(mesh.faces))\n")
    hf, torch_home = caches
    env = {**os.environ, **_env(hf, torch_home, tmp_path / "xdg")}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = trimesh.load(tmp_path / "mug.glb", force="mesh")
    assert len(saved.faces) == int(r.stdout.split()[-1]) > 100
