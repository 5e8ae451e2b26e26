"""`pixal3d-rt export --target aoti`: AOTInductor packages of the tiny preset built on the CPU, each
run through `AOTIEngine` against the eager network at token counts unlike the trace's; manifest,
up-to-date skip, atomicity, the runner's error paths, and `infer --engines` with CPU packages.

Compiling is the slow part (about 12-40 s per network on 2 cores, the first one longest), so the
module builds four networks once (the SS flow, the texture flow: the sparse spec with every kind
of input, the SS decoder, DINOv3 @LR); PIXAL3D_AOTI_ALL=1 builds all seven."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from engine_dirs import edit_manifest, export_tiny, one_network_copy
import torch

from pixal3d_rt.runtime import specs as S

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug.png"
BUILT = list(S.SPEC_NAMES) if os.environ.get("PIXAL3D_AOTI_ALL") else ["ss_flow", "tex_flow", "ss_decoder", "dinov3_lr"]
# dynamic axes away from the trace's (B 2, N 37): both CFG layouts, other token counts
CHECK_DIMS = [{"B": 1, "N": 53}, {"B": 2, "N": 61}]


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    t0 = time.perf_counter()
    d, manifest, log = export_tiny(tiny, tmp_path_factory, "aoti", "aoti", "fp32", BUILT, device="cpu")
    print(f"\naoti build of {len(BUILT)} tiny networks on {os.cpu_count()} cores: {time.perf_counter() - t0:.1f} s")
    for name, e in sorted(manifest["networks"].items()):
        print(f"  {name}: export {e['export_seconds']} s, compile {e['build_seconds']} s, {e['bytes'] / 1e6:.1f} MB")
    return d, manifest, log


@pytest.fixture
def pkg_dir(built, tmp_path):
    """A private copy of the package directory with the SS decoder only (tests damage it)."""
    return one_network_copy(built[0], tmp_path / "engines", "ss_decoder", "ss_decoder.pt2")


# ---------------------------------------------------------------------------------------------
# each package against the eager network


@pytest.mark.parametrize("name", S.SPEC_NAMES)
def test_package_matches_eager(built, tiny, name):
    from pixal3d_rt.export.modules import eager_outputs, example_inputs
    from pixal3d_rt.export.onnx_export import relative_errors
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine

    if name not in BUILT:
        pytest.skip("not built by default (PIXAL3D_AOTI_ALL=1 builds every network)")
    d, _, _ = built
    eng = AOTIEngine.load(d, name)
    spec = eng.spec
    assert eng.device == torch.device("cpu") and [t.name for t in spec.inputs] == [t.name for t in S.build_specs(
        tiny.configs, tiny.dino_config, tiny.geometry, only=[name])[0].inputs]
    net = tiny.load(spec, "fp32")
    gen = torch.Generator().manual_seed(11)
    dims_list = [{a: dims[a] for a in spec.profiles[0].axes} for dims in CHECK_DIMS] if spec.profiles else [{}]
    for dims in dims_list:
        inputs, coords = example_inputs(spec, dims, gen)
        ref = eager_outputs(spec, net, inputs, coords)
        if "x" in inputs:  # the runner casts and makes inputs contiguous: give it a strided fp64 view
            inputs["x"] = inputs["x"].double().transpose(0, -1).contiguous().transpose(0, -1)
        got = eng.run(inputs)
        assert set(got) == {t.name for t in spec.outputs}
        for t in spec.outputs:
            assert got[t.name].dtype == torch.float32 and got[t.name].shape == ref[t.name].shape
            err = relative_errors(got[t.name], ref[t.name])
            print(f"{name} {dims}: rel_l2 {err['rel_l2']:.2e} max_rel {err['max_rel']:.2e}")
            assert err["max_rel"] <= 1e-4, (dims, err)


def test_run_checks_shapes_and_the_exported_range(built):
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine

    d, _, _ = built
    eng = AOTIEngine.load(d, "tex_flow")
    hi = eng.spec.profiles[0].axes["N"][2]
    n = hi + 1
    too_many = {t.name: torch.zeros(t.concrete({"B": 1, "N": n})) for t in eng.spec.inputs}
    with pytest.raises(ValueError, match="outside every profile"):
        eng.run(too_many)
    ok = {t.name: torch.zeros(t.concrete({"B": 1, "N": 5})) for t in eng.spec.inputs}
    with pytest.raises(ValueError, match="axis N is 5 and 6"):
        eng.run(ok | {"rope_sin": torch.zeros(6, ok["rope_sin"].shape[1])})
    with pytest.raises(ValueError, match="missing input 'concat_cond'"):
        eng.run({k: v for k, v in ok.items() if k != "concat_cond"})


# ---------------------------------------------------------------------------------------------
# the export command: manifest, skip, atomicity


def test_manifest(built):
    from pixal3d_rt.export.trt_build import sha256_file
    from pixal3d_rt.runtime.aoti_engine import cpu_isa

    d, manifest, log = built
    on_disk = json.loads((d / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format"] == 1 and on_disk["target"] == "aoti" and on_disk["precision"] == "fp32"
    assert on_disk["torch_version"] == torch.__version__ and on_disk["device"] == "cpu"
    assert on_disk["cpu_capability"] == cpu_isa()["cpu_capability"] and on_disk["compute_capabilities"] == []
    assert "tensorrt_version" not in on_disk
    cmd = on_disk["rebuild_command"]
    assert "--preset tiny" in cmd and "--target aoti" in cmd and "--device cpu" in cmd and str(d) in cmd
    assert set(on_disk["networks"]) == set(BUILT)
    for name, e in on_disk["networks"].items():
        f = d / e["file"]
        assert e["file"] == f"{name}.pt2" and f.is_file()
        assert f.stat().st_size == e["bytes"] and sha256_file(f) == e["sha256"]
        assert e["spec"]["name"] == name and e["target"] == "aoti" and e["precision"] == "fp32"
        assert e["device"] == "cpu" and e["torch_version"] == torch.__version__ and "gpu" not in e
        assert e["cpu_features"] == cpu_isa()["cpu_features"]
        assert len(e["fingerprint"]) == 64 and e["export_seconds"] > 0 and e["build_seconds"] > 0
        (src,) = e["source_files"].values()
        assert len(src["sha256"]) == 64
        assert any(f"{name}: wrote {e['file']}" in line for line in log)
    tex = on_disk["networks"]["tex_flow"]["spec"]
    assert [i["name"] for i in tex["inputs"]][-1] == "concat_cond"
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no build folders left


def test_up_to_date_skip(built, tiny, monkeypatch):
    from pixal3d_rt.export import aoti_build
    from pixal3d_rt.export.trt_build import _fingerprint, export_engines

    d, manifest, _ = built
    stamps = {n: (d / f"{n}.pt2").stat().st_mtime_ns for n in BUILT}
    log = []
    m2 = export_engines(tiny, "aoti", d, precision="fp32", only=BUILT, device="cpu", progress=log.append)
    assert len(log) == len(BUILT) and all("up to date" in line for line in log), log
    assert {n: (d / f"{n}.pt2").stat().st_mtime_ns for n in BUILT} == stamps
    assert m2["networks"] == json.loads(json.dumps(manifest))["networks"]
    # another torch makes every package stale (its fingerprint changes)
    spec = S.build_specs(tiny.configs, tiny.dino_config, tiny.geometry, only=["ss_decoder"])[0]
    src = manifest["networks"]["ss_decoder"]["source_files"]
    fp = _fingerprint(spec, "aoti", "fp32", src, aoti_build.aoti_target("cpu").tied_to)
    assert fp == manifest["networks"]["ss_decoder"]["fingerprint"]
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert _fingerprint(spec, "aoti", "fp32", src, aoti_build.aoti_target("cpu").tied_to) != fp


def test_failure_after_build_keeps_the_old_package(pkg_dir, tiny):
    """An interrupt between compiling and renaming: the package already there and its manifest
    entry are untouched, and no build folder is left."""
    from pixal3d_rt.export.trt_build import export_engines, sha256_file

    before = (sha256_file(pkg_dir / "ss_decoder.pt2"), (pkg_dir / "manifest.json").read_bytes())
    seen = []

    def fail(spec):
        seen.append(sorted(p.name for p in (pkg_dir).iterdir()))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_engines(tiny, "aoti", pkg_dir, precision="fp32", only=["ss_decoder"], device="cpu", force=True,
                       progress=lambda m: None, _fail_after_build=fail)
    assert seen and any(n.startswith(".build-ss_decoder-") for n in seen[0])  # it did build, in a private folder
    assert (sha256_file(pkg_dir / "ss_decoder.pt2"), (pkg_dir / "manifest.json").read_bytes()) == before
    assert sorted(p.name for p in pkg_dir.iterdir()) == ["manifest.json", "ss_decoder.pt2"]


@pytest.mark.parametrize("exc", [RuntimeError("injected failure"), KeyboardInterrupt()])
def test_failure_while_compiling_leaves_no_package(tiny, tmp_path, monkeypatch, exc):
    """A compile that dies half-way through writing its package leaves no .pt2 and no entry; an
    error becomes one ExportError line, an interrupt stays an interrupt."""
    from pixal3d_rt.export.onnx_export import ExportError
    from pixal3d_rt.export.trt_build import export_engines

    def half_written(program, package_path):
        Path(package_path).write_bytes(b"PK\x03\x04 half a zip")
        raise exc

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", half_written)
    want = ExportError if isinstance(exc, Exception) else KeyboardInterrupt
    with pytest.raises(want) as info:
        export_engines(tiny, "aoti", tmp_path, precision="fp32", only=["ss_decoder"], device="cpu", progress=lambda m: None)
    if want is ExportError:
        assert "ss_decoder: AOTInductor compile failed" in str(info.value) and "injected failure" in str(info.value)
    assert not list(tmp_path.glob("*.pt2"))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "manifest.json"]
    m = json.loads((tmp_path / "manifest.json").read_text()) if (tmp_path / "manifest.json").exists() else {}
    assert "ss_decoder" not in m.get("networks", {})


# ---------------------------------------------------------------------------------------------
# the runner's error paths


def test_runner_checks_pass_on_a_good_package(pkg_dir):
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine
    from pixal3d_rt.runtime.tensorrt_engine import engine_class, read_manifest

    m, e, path = AOTIEngine.check(pkg_dir, "ss_decoder")
    assert path == pkg_dir / "ss_decoder.pt2" and e["spec"]["name"] == "ss_decoder"
    assert engine_class(e, read_manifest(pkg_dir)) is AOTIEngine


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_runner_corrupt_or_missing_package(pkg_dir, damage):
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine
    from pixal3d_rt.runtime.tensorrt_engine import EngineError

    f = pkg_dir / "ss_decoder.pt2"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 3]))
    else:
        f.unlink()
    what = "engine file not found" if damage == "missing" else "engine file is corrupt"
    with pytest.raises(EngineError, match=rf"ss_decoder.pt2: {what}.*rebuild with: pixal3d-rt export --preset tiny "
                                          rf"--target aoti .*--device cpu"):
        AOTIEngine.load(pkg_dir, "ss_decoder")


def test_runner_unloadable_package(pkg_dir):
    """A damaged package whose manifest was made to match it: torch's loader error becomes one line."""
    from pixal3d_rt.export.trt_build import sha256_file
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine
    from pixal3d_rt.runtime.tensorrt_engine import EngineError

    f = pkg_dir / "ss_decoder.pt2"
    f.write_bytes(f.read_bytes()[:5000])
    edit_manifest(pkg_dir, lambda m: m["networks"]["ss_decoder"].update(bytes=f.stat().st_size, sha256=sha256_file(f)))
    with pytest.raises(EngineError, match=r"ss_decoder.pt2: torch could not load the AOTInductor package \(RuntimeError: .*rebuild with"):
        AOTIEngine.load(pkg_dir, "ss_decoder")


def test_runner_torch_version_mismatch(pkg_dir):
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine
    from pixal3d_rt.runtime.tensorrt_engine import EngineError

    edit_manifest(pkg_dir, lambda m: m["networks"]["ss_decoder"].update(torch_version="2.0.1"))
    with pytest.raises(EngineError, match=rf"ss_decoder.pt2: built with torch 2.0.1, installed is {re.escape(torch.__version__)} "
                                          r"\(AOTInductor packages are tied to the torch version\); rebuild with: "
                                          r"pixal3d-rt export --preset tiny --target aoti .*\(or pip install torch==2.0.1\)"):
        AOTIEngine.load(pkg_dir, "ss_decoder")


def test_runner_device_mismatches(pkg_dir):
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine
    from pixal3d_rt.runtime.tensorrt_engine import EngineError

    with pytest.raises(EngineError, match=r"ss_decoder.pt2: compiled for cpu, asked to run on cuda .*--device cuda"):
        AOTIEngine.load(pkg_dir, "ss_decoder", device="cuda")
    good = json.loads((pkg_dir / "manifest.json").read_text())
    edit_manifest(pkg_dir, lambda m: m["networks"]["ss_decoder"].update(cpu_features=["avx_from_the_future", "sse2"]))
    with pytest.raises(EngineError, match=r"ss_decoder.pt2: compiled on a CPU with instructions this one lacks "
                                          r"\(avx_from_the_future\); rebuild with: .*on this machine"):
        AOTIEngine.load(pkg_dir, "ss_decoder")
    (pkg_dir / "manifest.json").write_text(json.dumps(good))
    edit_manifest(pkg_dir, lambda m: m["networks"]["ss_decoder"].update(device="cuda", compute_capabilities=["1.0"], gpu="GPU-from-the-past"))
    if torch.cuda.is_available():
        with pytest.raises(EngineError, match=r"ss_decoder.pt2: compiled for compute capability 1.0 \(GPU-from-the-past\), this GPU"):
            AOTIEngine.load(pkg_dir, "ss_decoder")
    else:
        with pytest.raises(EngineError, match=r"ss_decoder.pt2: compiled for an NVIDIA GPU and no CUDA device is visible; "
                                              r"rebuild with: .*--device cpu for CPU packages"):
            AOTIEngine.load(pkg_dir, "ss_decoder")
    edit_manifest(pkg_dir, lambda m: m["networks"]["ss_decoder"].update(target="tensorrt-rtx", device="cpu"))
    with pytest.raises(EngineError, match=r"ss_decoder.pt2: not an AOTInductor package \(target tensorrt-rtx\)"):
        AOTIEngine.check(pkg_dir, "ss_decoder")


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_export_summary_and_verify(built, tmp_path):
    """`export --target aoti --verify` on an up-to-date directory: nothing is rebuilt, the summary
    names torch and the CPU, and each package runs against the eager network on the CPU."""
    from click.testing import CliRunner

    from pixal3d_rt.cli import main

    d, _, _ = built
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--target", "aoti", "--out", str(d), "--precision", "fp32",
                                  "--device", "cpu", "--only", "ss_flow,ss_decoder", "--verify"])
    assert r.exit_code == 0, r.output
    assert "ss_flow: up to date (ss_flow.pt2)" in r.output and "wrote" not in r.output
    assert f"aoti torch {torch.__version__}, fp32, cpu (" in r.output
    verify = [line for line in r.output.splitlines() if line.startswith("verify ")]
    assert len(verify) == 2 and all(line.endswith("PASS (rel_l2 <= 0.005)") for line in verify), verify


def test_cli_export_aoti_errors(tmp_path):
    from click.testing import CliRunner

    from pixal3d_rt.cli import main

    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--out", str(out), "--target", "aoti", "--precision", "fp8"])
    assert r.exit_code == 2 and "--target aoti --precision fp8 is not available" in r.output
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--out", str(out), "--target", "tensorrt-rtx", "--device", "cpu"])
    assert r.exit_code == 2 and "--device is for --target aoti" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--out", str(out), "--target", "aoti", "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA GPU is visible" in r.output and "--device cpu" in r.output
    assert not out.exists()


def test_cli_infer_with_aoti_packages(built, tmp_path):
    """`infer --engines DIR` on the CPU with CPU packages: the packaged networks replace the eager
    ones (DINOv3 at its image size too) and the run writes a valid GLB."""
    import trimesh
    from click.testing import CliRunner

    from pixal3d_rt.cli import main

    d, _, _ = built
    out = tmp_path / "mug.glb"
    r = CliRunner().invoke(main, ["infer", "--preset", "tiny", "--image", str(EXAMPLE), "--output", str(out),
                                  "--device", "cpu", "--engines", str(d)])
    assert r.exit_code == 0, r.output
    for line in ("[engines] sparse_structure_flow_model: ss_flow.pt2", "[engines] tex_slat_flow_model_1024: tex_flow.pt2",
                 "[engines] sparse_structure_decoder: ss_decoder.pt2", "[engines] DINOv3 @96px: dinov3_lr"):
        assert line in r.output, line
    assert out.is_file() and out.read_bytes()[:4] == b"glTF"
    scene = trimesh.load(str(out))
    mesh = next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene
    assert len(mesh.faces) > 100


def test_cli_infer_refuses_gpu_engines_on_cpu(pkg_dir, tmp_path):
    from click.testing import CliRunner

    from pixal3d_rt.cli import main

    import hashlib

    trt = pytest.importorskip("tensorrt_rtx")
    # an intact TensorRT-RTX entry (file, size, sha256, installed version): refused for the device alone
    data = b"stand-in engine bytes"
    (pkg_dir / "tex_flow.engine").write_bytes(data)
    entry = {"target": "tensorrt-rtx", "file": "tex_flow.engine", "bytes": len(data), "device": "cuda",
             "sha256": hashlib.sha256(data).hexdigest(), "tensorrt_module": "tensorrt_rtx", "tensorrt_version": trt.__version__}
    edit_manifest(pkg_dir, lambda m: m["networks"].update(tex_flow={**next(iter(m["networks"].values())), **entry}))
    out = tmp_path / "mug.glb"
    r = CliRunner().invoke(main, ["infer", "--preset", "tiny", "--image", str(EXAMPLE), "--output", str(out),
                                  "--device", "cpu", "--engines", str(pkg_dir)])
    assert r.exit_code == 2 and "tex_flow run on an NVIDIA GPU (--device cuda)" in r.output, r.output
    assert not out.exists()
