"""Export: specs, ONNX export + onnxruntime parity (tiny preset), TensorRT-RTX engine builds on the
CPU, manifests, atomic writes, up-to-date skips, the engine runner's error paths and the stage
adapters (run here through onnxruntime), and the real-valued RoPE path of the flows."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from engine_dirs import HAVE_RTX, edit_manifest, export_tiny, needs_rtx, one_network_copy, ort_engine
from golden_fixtures import golden
import torch

from pixal3d_rt import config as C
from pixal3d_rt.models.flow_layers import apply_rope, rope_cos_sin, rope_phases
from pixal3d_rt.runtime import specs as S

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU that TensorRT can run on")

PARITY_DIMS = [{"B": 2, "N": 37}, {"B": 1, "N": 53}]  # both CFG layouts; odd token counts unlike the trace's


# ---------------------------------------------------------------------------------------------
# real-valued RoPE == complex RoPE (the exported path against the eager one)


@pytest.mark.parametrize("head_dim,dim", [(20, 3), (64, 3), (128, 3)])
def test_real_rope_equals_complex(head_dim, dim):
    g = torch.Generator().manual_seed(head_dim)
    coords = torch.randint(0, 97, (41, dim), generator=g)
    phases = rope_phases(coords, head_dim)
    x = torch.randn(2, 41, 3, head_dim, generator=g)
    ref = apply_rope(x, phases)
    got = apply_rope(x, rope_cos_sin(phases))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # and against the rotation written out independently, pair by pair
    ang = torch.angle(phases)
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
    want = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # bf16 activations come back bf16, rotated in fp32
    assert apply_rope(x.bfloat16(), rope_cos_sin(phases)).dtype == torch.bfloat16


def test_flow_forward_tokens_real_rope_matches_forward(tiny):
    from pixal3d_rt.models.flow_layers import DenseTokens
    from pixal3d_rt.models.sparse import SparseTensor
    from pixal3d_rt.export.modules import random_coords

    flow = tiny.preset.models["shape_slat_flow_model_512"]
    g = torch.Generator().manual_seed(3)
    coords = random_coords(29, 16, g)
    x = torch.randn(29, flow.in_channels, generator=g)
    gl, pr = torch.randn(1, 5, 32, generator=g), torch.randn(29, 64, generator=g)
    t = torch.tensor([731.0])
    with torch.no_grad():
        ref = flow(SparseTensor(x, coords), t, {"global": gl, "proj": SparseTensor(pr, coords)}).feats
        cs = rope_cos_sin(rope_phases(coords[:, 1:], flow.head_dim, flow.rope_freq))
        got = flow.forward_tokens(x[None], t, flow._context((gl, pr[None])), DenseTokens(), cs)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# specs


def _full_size_configs():
    names = {"sparse_structure_flow_model": "ss_flow_img_dit_1_3B_64_bf16",
             "sparse_structure_decoder": "ss_dec_conv3d_16l8_fp16",
             "shape_slat_flow_model_512": "slat_flow_img2shape_dit_1_3B_512_bf16",
             "shape_slat_flow_model_1024": "slat_flow_img2shape_dit_1_3B_1024_bf16",
             "tex_slat_flow_model_1024": "slat_flow_imgshape2tex_dit_1_3B_1024_bf16"}
    configs = {k: json.loads(golden("schema", f"{v}.json").read_text())["config"] for k, v in names.items()}
    dino = json.loads(golden("schema", "dinov3_vitl16.json").read_text())["config"]["args"]
    return configs, dino


def test_full_size_specs():
    configs, dino = _full_size_configs()
    specs = {s.name: s for s in S.build_specs(configs, dino, C.FULL)}
    assert list(specs) == list(S.SPEC_NAMES)
    ss = specs["ss_flow"]
    assert ss.input_shapes({"B": 2}) == {"x": (2, 8, 16, 16, 16), "t": (2,), "cond_global": (2, 5, 1024), "cond_proj": (2, 4096, 1024)}
    assert ss.profiles[0].axes == {"B": (1, 2, 2)}
    lr, hr, tex = specs["shape_lr_flow"], specs["shape_hr_flow"], specs["tex_flow"]
    assert lr.profiles[0].axes["N"] == (1, 4377, 32 ** 3)
    assert hr.profiles[0].axes["N"] == (1, 17489, 65536) == tex.profiles[0].axes["N"]
    assert tex.input_shapes({"B": 1, "N": 100}) == {
        "x": (1, 100, 32), "t": (1,), "cond_global": (1, 5, 1024), "cond_proj": (1, 100, 2048),
        "rope_cos": (100, 64), "rope_sin": (100, 64), "concat_cond": (1, 100, 32)}
    assert "concat_cond" not in hr.input_shapes({"B": 1, "N": 100})
    assert tex.onnx_dynamic_axes()["cond_proj"] == {0: "B", 1: "N"}
    assert tex.onnx_dynamic_axes()["rope_cos"] == {0: "N"}
    assert specs["ss_decoder"].output_shapes({}) == {"logits": (1, 1, 64, 64, 64)}
    assert specs["dinov3_lr"].output_shapes({})["tokens"] == (1, 1 + 4 + 32 * 32, 1024)
    assert specs["dinov3_hr"].output_shapes({})["tokens"] == (1, 1 + 4 + 64 * 64, 1024)
    # --max-tokens caps N (and keeps opt inside the range)
    capped = {s.name: s for s in S.build_specs(configs, dino, C.FULL, max_tokens=20000)}
    assert capped["tex_flow"].profiles[0].axes["N"] == (1, 17489, 20000)
    assert capped["shape_lr_flow"].profiles[0].axes["N"] == (1, 4377, 20000)
    # round trip through the manifest's JSON
    for s in specs.values():
        assert S.ExportSpec.from_json(json.loads(json.dumps(s.to_json()))).to_json() == s.to_json()


def test_profile_selection():
    p = S.ExportSpec("x", "k", "sparse_flow", [S.TensorSpec("x", ("B", "N", 4))], [S.TensorSpec("y", ("B", "N", 4))],
                     [S.Profile("small", {"B": (1, 2, 2), "N": (1, 100, 1000)}),
                      S.Profile("big", {"B": (1, 2, 2), "N": (500, 5000, 9000)})])
    assert p.profile_for({"B": 2, "N": 90}) == 0
    assert p.profile_for({"B": 2, "N": 4000}) == 1
    assert p.profile_for({"B": 1, "N": 600}) == 0  # both hold it: nearer opt wins
    with pytest.raises(ValueError, match="outside every profile"):
        p.profile_for({"B": 2, "N": 9001})


# ---------------------------------------------------------------------------------------------
# tiny preset: ONNX export of every spec, onnxruntime against the eager path


@pytest.fixture(scope="module")
def onnx_files(tiny, tmp_path_factory):
    from pixal3d_rt.export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for spec in S.build_specs(tiny.configs, tiny.dino_config, tiny.geometry):
        net = tiny.load(spec, "fp32")
        path = d / f"{spec.name}.onnx"
        info = export_onnx(spec, net, path)
        out[spec.name] = (spec, net, path, info)
    return out


@pytest.mark.parametrize("name", S.SPEC_NAMES)
def test_onnx_export_and_onnxruntime_parity(onnx_files, name):
    import onnx

    from pixal3d_rt.export.onnx_export import check_onnxruntime

    spec, net, path, info = onnx_files[name]
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
    for vi, t in zip(model.graph.input, spec.inputs):  # dynamic axes are symbolic, static ones fixed
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert dims == list(t.shape), (t.name, dims)
    assert not any(i.data_type in (14, 15) for i in model.graph.initializer)  # no complex numbers
    dims_list = PARITY_DIMS if spec.profiles else [{}]
    records = check_onnxruntime(spec, net, path, dims_list, seed=11)
    for r in records:
        print(f"{name} {r['dims']}: rel_l2 {r['rel_l2']:.2e} max_rel {r['max_rel']:.2e} (export {info['seconds']} s)")
        assert r["max_rel"] <= 1e-4, r


def test_stage_adapters_are_drop_in(onnx_files):
    """runtime.engine's adapters, driven by an onnxruntime Engine, against the eager networks:
    the SS flow (dense, CFG batch), the shape flow on a 2-item varlen SparseTensor, the texture
    flow with concat_cond, the SS decoder."""
    from pixal3d_rt.export.modules import random_coords
    from pixal3d_rt.models.sparse import SparseTensor
    from pixal3d_rt.runtime.engine import stage_module

    g = torch.Generator().manual_seed(5)
    mods = {n: (stage_module(ort_engine(s, p)), net) for n, (s, net, p, _) in onnx_files.items()}

    m, net = mods["ss_flow"]
    assert (m.resolution, m.in_channels) == (net.resolution, net.in_channels)
    x = torch.randn(2, 8, 8, 8, 8, generator=g)
    cond = {"global": torch.randn(2, 5, 32, generator=g), "proj": torch.randn(2, 512, 32, generator=g)}
    t = torch.tensor([1000.0, 412.5])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, cond), net(x, t, cond), rtol=1e-4, atol=1e-4)
        x1, t1 = x[:1], t[:1]
        c1 = {k: v[:1] for k, v in cond.items()}
        n1 = {k: torch.zeros_like(v) for k, v in c1.items()}
        pos, neg = m.cfg_pair(x1, t1, c1, n1)
        torch.testing.assert_close(pos, net(x1, t1, c1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(neg, net(x1, t1, n1), rtol=1e-4, atol=1e-4)

    c1, c2 = random_coords(23, 16, g), random_coords(31, 16, g)
    c2[:, 0] = 1
    coords = torch.cat([c1, c2])
    for name, key in (("shape_lr_flow", None), ("tex_flow", "concat")):
        m, net = mods[name]
        assert m.in_channels == net.in_channels
        cx = net.in_channels - (8 if key else 0)
        xs = SparseTensor(torch.randn(54, cx, generator=g), coords)
        cond = {"global": torch.randn(2, 5, 32, generator=g), "proj": SparseTensor(torch.randn(54, 64, generator=g), coords)}
        cc = SparseTensor(torch.randn(54, 8, generator=g), coords) if key else None
        t = torch.tensor([640.0, 640.0])
        neg = {"global": torch.zeros(2, 5, 32), "proj": SparseTensor(torch.zeros(54, 64), coords)}
        with torch.no_grad():
            got = m(xs, t, cond, concat_cond=cc)
            ref = net(SparseTensor(xs.feats, coords), t, cond, concat_cond=cc)
            pos2, neg2 = m.cfg_pair(xs, t, cond, neg, concat_cond=cc)
            ref_neg = net(SparseTensor(xs.feats, coords), t, neg, concat_cond=cc)
        assert got.coords is xs.coords
        torch.testing.assert_close(got.feats, ref.feats, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pos2.feats, ref.feats, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(neg2.feats, ref_neg.feats, rtol=1e-4, atol=1e-4)

    m, net = mods["ss_decoder"]
    z = torch.randn(1, 8, 8, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m(z), net(z), rtol=1e-4, atol=1e-4)


@needs_rtx
def test_use_engines_wires_the_pipeline(onnx_files, built, tmp_path, monkeypatch):
    """`infer --engines`: use_engines swaps the pipeline's networks for engine modules (the engine
    loader stubbed by onnxruntime here), refuses engines of a differently shaped network, and the
    real sampler runs the swapped SS flow with batched CFG to the eager result."""
    from pixal3d_rt.pipeline import Pipeline
    from pixal3d_rt.runtime import tensorrt_engine as te

    d, _, _ = built  # a real manifest: ss_decoder + tex_flow; add the fp32 SS flow's entry
    m = json.loads((d / "manifest.json").read_text())
    spec = onnx_files["ss_flow"][0]
    m["networks"]["ss_flow"] = dict(m["networks"]["ss_decoder"], spec=spec.to_json())
    m["networks"]["dinov3_lr"] = dict(m["networks"]["ss_decoder"], spec=onnx_files["dinov3_lr"][0].to_json())
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(te.TensorRTEngine, "load", classmethod(lambda cls, dd, name, device=None: ort_engine(
        S.ExportSpec.from_json(m["networks"][name]["spec"]), onnx_files[name][2])))
    pipe = Pipeline.from_preset("tiny")
    eager = pipe.models["sparse_structure_flow_model"]
    assert set(te.use_engines(pipe, tmp_path)) == {"sparse_structure_flow_model", "sparse_structure_decoder", "tex_slat_flow_model_1024", "dinov3_lr"}
    # the DINOv3 engine now encodes at its image size, with the eager tokens
    lr = pipe.geometry.lr_image
    assert set(pipe.conditioner.token_encoders) == {lr}
    img = torch.rand(1, 3, lr, lr, generator=torch.Generator().manual_seed(5))
    from pixal3d_rt.models.dinov3 import extract_tokens

    enc = pipe.conditioner.encode(img)
    want = extract_tokens(pipe.conditioner.dino, img)
    torch.testing.assert_close(enc.global_tokens, want[:, : enc.global_tokens.shape[1]], rtol=1e-4, atol=1e-4)
    flow = pipe.models["sparse_structure_flow_model"]
    assert hasattr(flow, "cfg_pair") and flow.resolution == eager.resolution
    assert pipe.flows["sparse_structure_flow_model"] is flow  # what the pipeline's sampler calls

    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 8, 8, 8, 8, generator=g)
    cond = {"global": torch.randn(1, 5, 32, generator=g), "proj": torch.randn(1, 512, 32, generator=g)}
    neg = {k: torch.zeros_like(v) for k, v in cond.items()}
    params = dict(steps=3, guidance_strength=7.5, guidance_rescale=0.7, rescale_t=5.0, guidance_interval=(0.0, 1.0))
    ref = pipe.sampler.sample(eager, noise, cond, neg, **params)
    got = pipe.sampler.sample(flow, noise, cond, neg, **params)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)

    m["networks"]["ss_flow"]["spec"]["meta"]["resolution"] = 9  # engines of other weights
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(te.EngineError, match="resolution 9, the loaded network 8"):
        te.use_engines(Pipeline.from_preset("tiny"), tmp_path)


@needs_rtx
def test_tensorrt_rtx_builds_every_tiny_spec(onnx_files):
    import tensorrt_rtx as trt

    from pixal3d_rt.export.trt_build import RTX_COMPUTE_CAPABILITIES, build_engine

    for name, (spec, _, path, _) in onnx_files.items():
        plan = build_engine(trt, path, spec, "tensorrt-rtx", RTX_COMPUTE_CAPABILITIES)
        assert plan is not None and plan.nbytes > 1000, name


# ---------------------------------------------------------------------------------------------
# the export command: manifest, skip, atomicity


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """bf16 engines of the SS decoder and the texture flow (the spec with every kind of input)."""
    if not HAVE_RTX:
        pytest.skip("tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    return export_tiny(tiny, tmp_path_factory, "engines", "tensorrt-rtx", "bf16", ["ss_decoder", "tex_flow"],
                       keep_onnx=True)


def test_manifest(built, tiny):
    import onnx
    import tensorrt_rtx as trt

    from pixal3d_rt.export.trt_build import sha256_file

    d, manifest, log = built
    on_disk = json.loads((d / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format"] == 1 and on_disk["target"] == "tensorrt-rtx"
    assert on_disk["tensorrt_module"] == "tensorrt_rtx" and on_disk["tensorrt_version"] == trt.__version__
    assert on_disk["precision"] == "bf16"
    assert on_disk["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"]
    assert "--preset tiny" in on_disk["rebuild_command"] and str(d) in on_disk["rebuild_command"]
    assert set(on_disk["networks"]) == {"ss_decoder", "tex_flow"}
    for name, e in on_disk["networks"].items():
        f = d / e["file"]
        assert f.is_file() and f.stat().st_size == e["bytes"] and sha256_file(f) == e["sha256"]
        assert e["spec"]["name"] == name and e["precision"] == "bf16" and e["build_seconds"] >= 0
        (src,) = e["source_files"].values()
        assert len(src["sha256"]) == 64
        assert any(f"{name}: wrote {e['file']}" in line and "build" in line for line in log)
    tex = on_disk["networks"]["tex_flow"]
    assert tex["spec"]["profiles"][0]["axes"]["N"] == [1, 17489, 65536]
    assert [i["name"] for i in tex["spec"]["inputs"]][-1] == "concat_cond"
    # the bf16 export really is bf16 inside (block Linears) with fp32 I/O
    model = onnx.load(str(d / "onnx" / "tex_flow.onnx"))
    kinds = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.BFLOAT16 in kinds and onnx.TensorProto.FLOAT in kinds
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    # nothing temporary left behind
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_up_to_date_skip_and_rebuild(built, tiny):
    from pixal3d_rt.export.trt_build import export_engines

    d, manifest, _ = built
    f = d / "ss_decoder.engine"
    before = (f.stat().st_mtime_ns, manifest["networks"]["ss_decoder"]["sha256"])
    log = []
    export_engines(tiny, "tensorrt-rtx", d, precision="bf16", only=["ss_decoder", "tex_flow"], progress=log.append)
    assert [l for l in log if "up to date" in l] == ["[1/2] tex_flow: up to date (tex_flow.engine)",
                                                     "[2/2] ss_decoder: up to date (ss_decoder.engine)"]
    assert f.stat().st_mtime_ns == before[0]
    # a damaged engine is not up to date: it is rebuilt (and only it)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    log = []
    m2 = export_engines(tiny, "tensorrt-rtx", d, precision="bf16", only=["ss_decoder"], progress=log.append)
    assert any("ss_decoder: wrote ss_decoder.engine" in l for l in log)
    assert m2["networks"]["ss_decoder"]["sha256"] != "" and (d / "tex_flow.engine").is_file()
    assert set(m2["networks"]) == {"ss_decoder", "tex_flow"}  # entries of other networks are kept


def test_flows_build_with_weight_streaming(built, tiny):
    """The flows are built with TensorRT's weight streaming flag (on by default) and the manifest
    says so; every entry records the network's weight sizes as exported (what the planner reads)."""
    import dataclasses
    from types import SimpleNamespace

    import tensorrt_rtx as trt

    from pixal3d_rt.export.trt_build import ExportError, build_engine
    from pixal3d_rt.runtime.planner import network_size

    d, manifest, log = built
    nets = json.loads((d / "manifest.json").read_text())["networks"]
    assert nets["tex_flow"]["weight_streaming"] is True and nets["ss_decoder"]["weight_streaming"] is False
    assert "--no-weight-streaming" not in manifest["rebuild_command"]
    assert [line for line in log if "with weight streaming" in line] == [
        line for line in log if "tex_flow" in line and "building" in line]
    for name, e in nets.items():
        want = network_size(tiny.load(S.ExportSpec.from_json(e["spec"]), "bf16"))
        assert e["weights"] == dataclasses.asdict(want), name
    assert nets["tex_flow"]["weights"]["units"] == 2 and nets["tex_flow"]["weights"]["unit_bytes"] > 0
    # the flag is part of the serialized engine: the same ONNX built without it gives another engine
    spec = S.ExportSpec.from_json(nets["tex_flow"]["spec"])
    plain = build_engine(trt, d / "onnx" / "tex_flow.onnx", spec, "tensorrt-rtx", ("8.6",))
    streaming = build_engine(trt, d / "onnx" / "tex_flow.onnx", spec, "tensorrt-rtx", ("8.6",), weight_streaming=True)
    assert bytes(plain) != bytes(streaming)
    # a TensorRT without the flag refuses instead of building an engine that cannot stream
    old = SimpleNamespace(**{k: getattr(trt, k) for k in dir(trt) if not k.startswith("__") or k in ("__name__", "__version__")})
    old.BuilderFlag = SimpleNamespace()
    with pytest.raises(ExportError, match="cannot build with weight streaming.*--no-weight-streaming"):
        build_engine(old, d / "onnx" / "tex_flow.onnx", spec, "tensorrt-rtx", ("8.6",), weight_streaming=True)


def test_weight_streaming_option_rebuilds_only_the_flows(built, tiny, tmp_path):
    """Turning weight streaming off changes what the flows' engines are (they are rebuilt, and the
    rebuild command says so) and nothing else's (the SS decoder stays up to date)."""
    import shutil

    from pixal3d_rt.export.trt_build import export_engines

    d = tmp_path / "engines"
    shutil.copytree(built[0], d)
    log = []
    m = export_engines(tiny, "tensorrt-rtx", d, precision="bf16", only=["ss_decoder"], weight_streaming=False,
                       progress=log.append)
    assert log == ["[1/1] ss_decoder: up to date (ss_decoder.engine)"]
    assert m["rebuild_command"].endswith(" --no-weight-streaming")

    class Rebuilding(Exception):
        pass

    def refuse(spec, precision):
        raise Rebuilding(spec.name)

    tiny.load = refuse  # the export reaches for the network only to rebuild it
    try:
        with pytest.raises(Rebuilding, match="tex_flow"):
            export_engines(tiny, "tensorrt-rtx", d, precision="bf16", only=["tex_flow"], weight_streaming=False,
                           progress=lambda line: None)
        log = []
        export_engines(tiny, "tensorrt-rtx", d, precision="bf16", only=["tex_flow"], progress=log.append)
        assert log == ["[1/1] tex_flow: up to date (tex_flow.engine)"]
    finally:
        del tiny.load


@needs_rtx
@pytest.mark.parametrize("exc", [RuntimeError("injected failure"), KeyboardInterrupt()])
def test_failure_mid_build_leaves_no_engine(tiny, tmp_path, exc):
    from pixal3d_rt.export.trt_build import export_engines

    def fail(spec):
        raise exc

    with pytest.raises(type(exc)):
        export_engines(tiny, "tensorrt-rtx", tmp_path, precision="fp32", only=["ss_decoder"], progress=lambda m: None,
                       _fail_after_build=fail)
    assert not (tmp_path / "ss_decoder.engine").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name != "manifest.json"]  # no temp files or build folders
    m = json.loads((tmp_path / "manifest.json").read_text()) if (tmp_path / "manifest.json").exists() else {}
    assert "ss_decoder" not in m.get("networks", {})


def test_failure_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    from pixal3d_rt.export import trt_build

    f = tmp_path / "a.engine"
    trt_build.atomic_write_bytes(f, b"old engine")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(trt_build.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        trt_build.atomic_write_bytes(f, b"new engine, half written")
    assert f.read_bytes() == b"old engine"
    assert [p.name for p in tmp_path.iterdir()] == ["a.engine"]


@needs_rtx
def test_cli_export_from_a_weights_directory(tiny, tmp_path, monkeypatch):
    """`pixal3d-rt export --weights DIR`: networks come from the checkpoint files (strict loader),
    their hashes go into the manifest, and a second run neither rebuilds nor re-hashes them."""
    from click.testing import CliRunner

    from pixal3d_rt.checkpoints import write_weights
    from pixal3d_rt.cli import main
    from pixal3d_rt.export import trt_build

    wdir = write_weights(tiny.preset, tmp_path / "w")
    out = tmp_path / "e"
    args = ["export", "--weights", str(wdir), "--out", str(out), "--only", "ss_decoder", "--precision", "fp16"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "ss_decoder: wrote ss_decoder.engine" in r.output and "tensorrt-rtx" in r.output
    e = json.loads((out / "manifest.json").read_text())["networks"]["ss_decoder"]
    files = {k: v for k, v in e["source_files"].items()}
    assert set(files) == {"ckpts/ss_dec_conv3d_16l8_fp16.json", "ckpts/ss_dec_conv3d_16l8_fp16.safetensors"}
    for k, v in files.items():
        assert v["sha256"] == trt_build.sha256_file(wdir / k) and v["bytes"] == (wdir / k).stat().st_size
    hashed = []
    real = trt_build.sha256_file
    monkeypatch.setattr(trt_build, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "ss_decoder: up to date" in r.output, r.output
    assert not [p for p in hashed if wdir in p.parents]  # size + mtime unchanged: hashes come from the manifest


# ---------------------------------------------------------------------------------------------
# the engine runner: what can be checked without a GPU


@pytest.fixture
def engine_dir(built, tmp_path):
    """A private copy of the built engine directory with the SS decoder only (tests damage it)."""
    return one_network_copy(built[0], tmp_path / "engines", "ss_decoder", "ss_decoder.engine")


def test_runner_checks_pass_on_a_good_engine(engine_dir):
    from pixal3d_rt.runtime.tensorrt_engine import TensorRTEngine

    m, e, path = TensorRTEngine.check(engine_dir, "ss_decoder")
    assert path == engine_dir / "ss_decoder.engine" and e["spec"]["name"] == "ss_decoder"


def test_runner_missing_directory_manifest_or_file(engine_dir, tmp_path):
    from pixal3d_rt.runtime.tensorrt_engine import EngineError, TensorRTEngine

    with pytest.raises(EngineError, match=r"nowhere: engine directory not found.*pixal3d-rt export"):
        TensorRTEngine.check(tmp_path / "nowhere", "ss_decoder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EngineError, match=r"manifest.json: not found.*pixal3d-rt export"):
        TensorRTEngine.check(empty, "ss_decoder")
    with pytest.raises(EngineError, match=r"no engine 'tex_flow'.*rebuild with: pixal3d-rt export --preset tiny"):
        TensorRTEngine.check(engine_dir, "tex_flow")
    (engine_dir / "ss_decoder.engine").unlink()
    with pytest.raises(EngineError, match=r"ss_decoder.engine: engine file not found; rebuild with: pixal3d-rt export --preset tiny"):
        TensorRTEngine.check(engine_dir, "ss_decoder")


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_runner_corrupt_engine(engine_dir, damage):
    from pixal3d_rt.runtime.tensorrt_engine import EngineError, TensorRTEngine

    f = engine_dir / "ss_decoder.engine"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[100] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(os.urandom(len(data)))
    f.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"ss_decoder.engine: engine file is corrupt.*rebuild with: pixal3d-rt export"):
        TensorRTEngine.check(engine_dir, "ss_decoder")


def test_runner_manifest_version_mismatches(engine_dir):
    from pixal3d_rt.runtime.tensorrt_engine import EngineError, TensorRTEngine

    edit_manifest(engine_dir, lambda m: m["networks"]["ss_decoder"].update(tensorrt_version="0.0.1"))
    with pytest.raises(EngineError, match=r"ss_decoder.engine: built with tensorrt_rtx 0.0.1, installed is .*rebuild with"):
        TensorRTEngine.check(engine_dir, "ss_decoder")
    edit_manifest(engine_dir, lambda m: m["networks"]["ss_decoder"].update(tensorrt_module="tensorrt", tensorrt_version="10.1"))
    with pytest.raises(EngineError, match=r"built with tensorrt 10.1, (which is not installed|installed is)"):
        TensorRTEngine.check(engine_dir, "ss_decoder")
    edit_manifest(engine_dir, lambda m: m["networks"]["ss_decoder"].update(tensorrt_module="antigravity"))
    with pytest.raises(EngineError, match=r"built with 'antigravity', not a TensorRT module"):  # never imported
        TensorRTEngine.check(engine_dir, "ss_decoder")
    edit_manifest(engine_dir, lambda m: m.update(format=99))
    with pytest.raises(EngineError, match=r"manifest format 99, this pixal3d-rt reads format 1; rebuild with"):
        TensorRTEngine.check(engine_dir, "ss_decoder")
    (engine_dir / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match=r"manifest.json: not valid JSON"):
        TensorRTEngine.check(engine_dir, "ss_decoder")


def test_runner_binds_tensors_and_switches_profiles():
    """TensorRTEngine.run against a stand-in for TensorRT's engine/context (the real one needs a
    GPU): inputs cast to the engine dtypes and bound by name, the profile that holds the shapes
    selected (and only re-selected when it changes), outputs allocated at the context's shapes."""
    from types import SimpleNamespace

    from pixal3d_rt.runtime.tensorrt_engine import TensorRTEngine

    spec = S.ExportSpec("f", "k", "sparse_flow",
                        [S.TensorSpec("x", ("B", "N", 4)), S.TensorSpec("rope_cos", ("N", 2))], [S.TensorSpec("velocity", ("B", "N", 3))],
                        [S.Profile("small", {"B": (1, 2, 2), "N": (1, 64, 100)}), S.Profile("big", {"B": (1, 2, 2), "N": (90, 500, 1000)})])
    DT = SimpleNamespace(FLOAT="f32", HALF="f16")
    trt = SimpleNamespace(DataType=DT, ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user"))
    calls, memory = [], []

    class Ctx:
        shapes = {}

        def update_device_memory_size_for_shapes(self):
            return 64 * self.shapes["x"][1]

        def set_device_memory(self, ptr, size):
            memory.append(size)

        def set_optimization_profile_async(self, i, stream):
            calls.append(("profile", i))

        def set_input_shape(self, name, shape):
            self.shapes[name] = shape

        def set_tensor_address(self, name, ptr):
            calls.append(("bind", name))

        def get_tensor_shape(self, name):
            x = self.shapes["x"]
            return (x[0], x[1], 3)

        def execute_async_v3(self, stream):
            calls.append(("run", dict(self.shapes)))
            return True

    class Eng:
        num_io_tensors = 3
        names = ["x", "rope_cos", "velocity"]

        def create_execution_context(self, strategy):
            calls.append(("context", strategy))
            return Ctx()

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_dtype(self, n):
            return DT.HALF if n == "x" else DT.FLOAT

    eng = TensorRTEngine(Path("f.engine"), spec, trt, Eng(), torch.device("cpu"))
    assert eng.dtypes == {"x": torch.float16, "rope_cos": torch.float32, "velocity": torch.float32}
    assert eng.context is None  # created by the first run (or the first stage), not at load
    out = eng.run({"x": torch.randn(2, 50, 4), "rope_cos": torch.randn(50, 2)})
    assert out["velocity"].shape == (2, 50, 3) and out["velocity"].dtype == torch.float32
    assert calls[0] == ("context", "user")  # its working memory is the runner's: sized for the shapes
    assert memory == [64 * 50] and eng.activations.numel() == 64 * 50
    assert ("profile", 0) not in calls  # profile 0 is the context's initial one
    eng.run({"x": torch.randn(1, 700, 4), "rope_cos": torch.randn(700, 2)})
    eng.run({"x": torch.randn(1, 600, 4), "rope_cos": torch.randn(600, 2)})
    assert [c for c in calls if c[0] == "profile"] == [("profile", 1)]
    assert calls[-1] == ("run", {"x": (1, 600, 4), "rope_cos": (600, 2)})
    assert [c[1] for c in calls[-4:-1]] == ["x", "rope_cos", "velocity"]
    assert memory == [64 * 50, 64 * 700, 64 * 700] and eng.activations.numel() == 64 * 700  # grown, kept
    assert [c for c in calls if c[0] == "context"] == [("context", "user")]
    with pytest.raises(ValueError, match="axis N is 600 and 601"):
        eng.run({"x": torch.randn(1, 600, 4), "rope_cos": torch.randn(601, 2)})
    with pytest.raises(ValueError, match="outside every profile"):
        eng.run({"x": torch.randn(1, 5000, 4), "rope_cos": torch.randn(5000, 2)})
    with pytest.raises(ValueError, match="missing input 'rope_cos'"):
        eng.run({"x": torch.randn(1, 6, 4)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_runner_without_gpu_says_so(engine_dir):
    from pixal3d_rt.runtime.tensorrt_engine import EngineError, TensorRTEngine

    with pytest.raises(EngineError, match=r"ss_decoder.engine: TensorRT engines run on an NVIDIA GPU"):
        TensorRTEngine.load(engine_dir, "ss_decoder")


def test_runner_on_a_cpu_device_says_so(engine_dir, monkeypatch):
    """Asked for the CPU on a machine with a GPU: the loader's own message, not torch's ValueError."""
    from pixal3d_rt.runtime.tensorrt_engine import EngineError, TensorRTEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(EngineError, match=r"ss_decoder.engine: TensorRT engines run on an NVIDIA GPU, asked for cpu"):
        TensorRTEngine.load(engine_dir, "ss_decoder", device="cpu")


def test_cli_export_errors(tmp_path):
    from click.testing import CliRunner

    from pixal3d_rt.cli import main

    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--out", str(tmp_path / "e"), "--target", "aoti", "--precision", "fp8"])
    assert r.exit_code == 2 and "--target aoti --precision fp8 is not available" in r.output
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--out", str(tmp_path / "e"), "--precision", "fp8",
                                  "--compute-capability", "8.6"])
    assert r.exit_code == 2 and "8.6, which has no FP8 tensor cores" in r.output
    r = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "no weights given" in r.output
    r = CliRunner().invoke(main, ["export", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "weights directory not found" in r.output
    assert not (tmp_path / "e" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# on a GPU TensorRT-RTX runs on (Ampere/Ada/Blackwell): the engines against the eager networks


@needs_gpu
@needs_rtx
def test_gpu_engines_match_eager(built, tiny):
    from pixal3d_rt.export.trt_build import verify_engines
    from pixal3d_rt.runtime.tensorrt_engine import EngineError

    d, _, _ = built
    major, _ = torch.cuda.get_device_capability()
    if major == 9:
        with pytest.raises(EngineError, match="does not run on Hopper"):
            verify_engines(tiny, d, progress=print)
        return
    records = verify_engines(tiny, d, progress=print)
    assert records and all(r["ok"] for r in records), records
