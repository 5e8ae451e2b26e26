"""`--precision fp8`: calibration, FP8 weights, the QDQ graph (onnx.checker, onnxruntime against the
eager network and against its fake-quantized twin), the MatMul-to-Linear mapping's failure modes, and
TensorRT-RTX fp8 engine builds on the CPU (manifest, compute capabilities, FP8 inside the engine)."""
from __future__ import annotations

import json
import re

import pytest
from engine_dirs import HAVE_RTX, export_tiny, needs_rtx
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pixal3d_rt.export import fp8  # noqa: E402
from pixal3d_rt.export.onnx_export import ExportError  # noqa: E402
from pixal3d_rt.runtime import specs as S  # noqa: E402


# fp8 error band of the tiny preset's flows against the unquantized network (rel L2). Measured with
# onnxruntime: 0.031-0.040 (ss_flow, shape_lr_flow, tex_flow; B = 1 and 2); E4M3 keeps 3 mantissa bits,
# so each quantized GEMM operand carries ~2-3 % rounding noise. Above 0.1 something is wrong (a scale on
# the wrong axis, a clipped activation); below 0.005 nothing was quantized.
FP8_BAND = (0.005, 0.1)
# the fp8 graph against the eager network with the same QDQ (fake-quantized): measured 1e-6, up to 3e-3
# where a different fp32 summation order moves a value across an fp8 rounding boundary
FAKE_QUANT_TOL = 1e-2
BLOCK_LINEARS = ["self_attn.to_qkv", "self_attn.to_out", "cross_attn.cross_attn_block.to_q",
                 "cross_attn.cross_attn_block.to_kv", "cross_attn.cross_attn_block.to_out", "cross_attn.proj_linear",
                 "mlp.mlp.0", "mlp.mlp.2"]


def _spec(tiny, name):
    (spec,) = S.build_specs(tiny.configs, tiny.dino_config, tiny.geometry, only=[name])
    return spec


def test_quantized_linears_are_the_block_gemms(tiny):
    net = tiny.load(_spec(tiny, "ss_flow"), "fp8")
    names = fp8.quantized_linear_names(net)
    assert names == [f"blocks.{b}.{n}" for b in range(2) for n in BLOCK_LINEARS]
    # fp8 loads the bf16 export network: block Linears bf16, everything around them fp32
    assert all(dict(net.named_modules())[n].weight.dtype == torch.bfloat16 for n in names)
    assert net.input_layer.weight.dtype == torch.float32 and net.t_embedder.mlp[0].weight.dtype == torch.float32


def test_calibration_timesteps_follow_the_sampler():
    from pixal3d_rt.sampler import t_schedule

    spec = S.ExportSpec("ss_flow", "k", "dense_flow", [], [], [])
    ts = t_schedule(12, 5.0)  # the SS stage: 12 steps, rescale_t 5
    assert fp8.calibration_timesteps(spec, 4) == pytest.approx([1000 * ts[i] for i in (0, 4, 7, 11)])
    assert fp8.calibration_timesteps(spec, 4)[-1] == pytest.approx(312.5)
    assert len(fp8.calibration_timesteps(spec, 99)) == 12  # never t = 0


def test_calibration_records_the_linear_inputs(tiny):
    """amax of each Linear's input, checked where the input is known independently: proj_linear reads
    cond_proj, whose row 1 is the all-zero unconditional condition."""
    from pixal3d_rt.export.modules import example_inputs

    spec = _spec(tiny, "shape_lr_flow")
    net = tiny.load(spec, "fp8")
    cal = fp8.calibrate(spec, net, points=2, max_tokens=300, seed=7)
    assert cal.settings["dims"] == {"B": 2, "N": 300} and cal.settings["forwards"] == 2
    assert set(cal.input_amax) == set(fp8.quantized_linear_names(net))
    gen = torch.Generator().manual_seed(7)
    want = 0.0
    for _ in range(2):  # the same draws as calibrate's
        inputs, _ = example_inputs(spec, {"B": 2, "N": 300}, gen)
        want = max(want, float(inputs["cond_proj"][0].abs().max()))  # calibrated in fp32 on a CPU
    assert cal.input_amax["blocks.0.cross_attn.proj_linear"] == want == cal.input_amax["blocks.1.cross_attn.proj_linear"]
    assert cal.input_amax["blocks.0.mlp.mlp.2"] != cal.input_amax["blocks.1.mlp.mlp.2"]
    again = fp8.calibrate(spec, net, points=2, max_tokens=300, seed=7)
    assert again.input_amax == cal.input_amax  # seeded: the same scales every export


def test_weight_quantization():
    lin = torch.nn.Linear(40, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 6)[:, None])
        lin.weight[2] = 0  # a dead output channel must not give scale 0
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList([torch.nn.Module()])
    net.blocks[0].mlp = lin
    (q,) = fp8.quantize_linears(net, fp8.Calibration({"blocks.0.mlp": 3.0}, {})).values()
    w = lin.weight.detach()
    assert q.weight_fp8.dtype == torch.float8_e4m3fn and q.weight_fp8.shape == (6, 40)
    assert float(q.input_scale) == float(torch.tensor(3.0 / 448).bfloat16().float())
    assert torch.equal(q.weight_scale, q.weight_scale.bfloat16().float())  # representable in the graph's bf16
    # per-output-channel: each row's largest magnitude lands on the top of the E4M3 range
    top = q.weight_fp8.float().abs().amax(dim=1)
    assert torch.all((top[[0, 1, 3, 4, 5]] >= 416) & (top[[0, 1, 3, 4, 5]] <= 448)) and top[2] == 0
    deq = q.weight(torch.float32)
    assert torch.all(deq[2] == 0)
    for o in (0, 1, 3, 4, 5):  # 3 mantissa bits: ≤ 2^-4 relative error per normal value, rows of 1e-3..1e2 alike
        err = ((deq[o] - w[o]).norm() / w[o].norm()).item()
        assert 0 < err < 0.04, (o, err)


# ---------------------------------------------------------------------------------------------
# the fp8 graph


@pytest.fixture(scope="module")
def fp32_graphs(tiny, tmp_path_factory):
    """fp8 QDQ graphs over the fp32 torso (onnxruntime's CPU provider runs FP8 Q/DQ in fp32, not bf16),
    and the plain ss_flow graph before the rewrite."""
    import onnx

    from pixal3d_rt.export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("fp8")
    out = {}
    for name in ("ss_flow", "tex_flow"):
        spec = _spec(tiny, name)
        net = tiny.load(spec, "fp32")
        path = d / f"{name}.onnx"
        export_onnx(spec, net, path, external_data=name == "tex_flow")  # the full-size flows' layout, rewritten too
        if name == "ss_flow":
            out["plain"] = onnx.load(str(path))
        quant = fp8.quantize_linears(net, fp8.calibrate(spec, net))
        info = fp8.insert_qdq(path, spec, net, quant)
        out[name] = (spec, net, path, quant, info)
    return out


def _value(init) -> torch.Tensor:
    """fp32 values of a FLOAT or BFLOAT16 initializer."""
    from onnx import TensorProto as TP

    dt = {TP.FLOAT: torch.float32, TP.BFLOAT16: torch.bfloat16}[init.data_type]
    raw = torch.frombuffer(bytearray(init.raw_data), dtype=torch.int16 if dt == torch.bfloat16 else torch.float32)
    return raw.view(dt).float().reshape(tuple(init.dims))


def _graph_checks(path, quant, scale_type):
    """Every quantized MatMul reads DQ(Q(x)) and DQ(fp8 weight); the fp8 bytes are the quantized weights."""
    import onnx
    from onnx import TensorProto as TP

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)  # with shape/type inference
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    mm = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".weight_dq")]
    assert len(mm) == len(quant) == sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    for node in mm:
        name = node.input[1][len("flow."):-len(".weight_dq")]
        q = quant[name]
        xdq, wdq = producer[node.input[0]], producer[node.input[1]]
        assert xdq.op_type == wdq.op_type == "DequantizeLinear"
        xq = producer[xdq.input[0]]
        assert xq.op_type == "QuantizeLinear" and xq.input[1] == xdq.input[1]
        assert inits[xq.input[2]].data_type == TP.FLOAT8E4M3FN and inits[xq.input[2]].raw_data == b"\x00"
        assert inits[xq.input[1]].data_type == scale_type and list(inits[xq.input[1]].dims) == []
        w8, ws = inits[wdq.input[0]], inits[wdq.input[1]]
        assert w8.data_type == TP.FLOAT8E4M3FN and ws.data_type == scale_type
        assert float(_value(inits[xq.input[1]])) == float(q.input_scale)
        assert torch.equal(_value(ws), q.weight_scale)
        assert {a.name: a.i for a in wdq.attribute}["axis"] == 1 and list(w8.dims) == list(q.weight_fp8.t().shape)
        assert w8.raw_data == q.weight_fp8.t().contiguous().view(torch.uint8).numpy().tobytes()
    return model


def test_fp8_graph_structure(fp32_graphs):
    from onnx import TensorProto as TP

    for name in ("ss_flow", "tex_flow"):
        spec, net, path, quant, info = fp32_graphs[name]

        assert info["quantized_linears"] == 16
        assert info["fp8_weight_bytes"] == sum(q.weight_fp8.numel() for q in quant.values())
        data = path.parent / (path.name + ".data")
        assert data.exists() == (name == "tex_flow")
        assert info["onnx_bytes"] == path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        assert sorted(f.name for f in path.parent.iterdir() if f.name.startswith(name)) == [path.name] + ([data.name] if data.exists() else [])
        model = _graph_checks(path, quant, TP.FLOAT)
        # the replaced fp32 weights are gone from the graph
        shapes = {tuple(i.dims) for i in model.graph.initializer if i.data_type == TP.FLOAT}
        assert (64, 341) not in shapes and (64, 192) not in shapes


def test_onnxruntime_fp8_parity(fp32_graphs):
    """The fp8 graph through onnxruntime: near the fake-quantized eager network (same QDQ), within the
    fp8 band of the unquantized one, and not equal to it (quantization happened)."""
    import onnxruntime as ort

    from pixal3d_rt.export.modules import eager_outputs, example_inputs
    from pixal3d_rt.export.onnx_export import relative_errors

    for name in ("ss_flow", "tex_flow"):
        spec, net, path, quant, _ = fp32_graphs[name]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        gen = torch.Generator().manual_seed(11)
        for dims in ([{"B": 2}, {"B": 1}] if spec.kind == "dense_flow" else [{"B": 2, "N": 37}, {"B": 1, "N": 53}]):
            inputs, coords = example_inputs(spec, dims, gen)
            ref = eager_outputs(spec, net, inputs, coords)["velocity"]
            with fp8.fake_quantized(net, quant):
                fake = eager_outputs(spec, net, inputs, coords)["velocity"]
            got = torch.from_numpy(sess.run(None, {t.name: inputs[t.name].numpy() for t in spec.inputs})[0])
            e_ref, e_fake = relative_errors(got, ref), relative_errors(got, fake)
            print(f"{name} {dims}: fp8 vs eager rel_l2 {e_ref['rel_l2']:.3e} max_rel {e_ref['max_rel']:.3e}; "
                  f"vs fake-quant rel_l2 {e_fake['rel_l2']:.2e}")
            assert torch.isfinite(got).all()
            assert FP8_BAND[0] < e_ref["rel_l2"] < FP8_BAND[1], e_ref
            assert e_fake["rel_l2"] < FAKE_QUANT_TOL, e_fake
        # fake_quantized restored the network
        assert all(dict(net.named_modules())[n].weight.dtype == torch.float32 for n in quant)


def test_mapping_fails_loudly(fp32_graphs, tiny):
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(fp32_graphs["plain"])
    net = tiny.load(_spec(tiny, "ss_flow"), "fp32")
    names = fp8.quantized_linear_names(net)
    found = fp8.map_linears(model, net, "flow.", names)
    assert set(found) == set(names) and all(axis == 1 for _, _, axis in found.values())
    # a Linear the graph does not have
    with pytest.raises(ExportError, match=r"1 of 17 Linears have no MatMul.*blocks.0.adaLN_nothing"):
        fp8.map_linears(model, net, "flow.", names + ["blocks.0.adaLN_nothing"])
    # a MatMul in a Linear's scope whose weight is not that Linear's
    with torch.no_grad():
        net.blocks[1].mlp.mlp[0].weight[0, 0] += 1
    with pytest.raises(ExportError, match=r"scope of Linear blocks.1.mlp.mlp.0 but its weight .* is not that Linear's weight"):
        fp8.map_linears(model, net, "flow.", names)
    # an exporter that wrote no name scopes
    for n in model.graph.node:
        del n.metadata_props[:]
    with pytest.raises(ExportError, match="16 of 16 Linears have no MatMul.*no name scopes"):
        fp8.map_linears(model, net, "flow.", names)


# ---------------------------------------------------------------------------------------------
# requests and engines


def test_fp8_requests_are_checked():
    from pixal3d_rt.export.trt_build import VERIFY_TOLERANCE, check_request

    fp8.check_compute_capabilities(("8.9", "12.0"), "tensorrt-rtx")
    fp8.check_compute_capabilities(("9.0",), "tensorrt")  # Hopper has FP8 (full TensorRT)
    with pytest.raises(ExportError, match=r"--compute-capability 8.6 is compute capability 8.6, which has no FP8 tensor cores"):
        fp8.check_compute_capabilities(("8.9", "8.6"), "tensorrt-rtx")
    with pytest.raises(ExportError, match=r"this GPU is compute capability 8.0, which has no FP8"):
        fp8.check_compute_capabilities(("8.0",), "tensorrt")
    with pytest.raises(ExportError, match="--target aoti --precision fp8 is not available"):
        check_request("aoti", "fp8")
    assert VERIFY_TOLERANCE["bf16"] < VERIFY_TOLERANCE["fp8"] <= 0.1


@needs_rtx
def test_fp8_rejects_gpus_without_fp8_before_loading(tiny, tmp_path):
    from click.testing import CliRunner

    from pixal3d_rt.cli import main
    from pixal3d_rt.export.trt_build import export_engines

    loaded = []
    real = tiny.load
    tiny.load = lambda *a, **k: loaded.append(a) or real(*a, **k)
    try:
        with pytest.raises(ExportError, match="8.6, which has no FP8 tensor cores"):
            export_engines(tiny, "tensorrt-rtx", tmp_path / "e", precision="fp8", compute_capabilities=("8.6", "8.9"),
                           progress=lambda m: None)
    finally:
        del tiny.load
    assert not loaded and not (tmp_path / "e" / "manifest.json").exists()
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--out", str(tmp_path / "e"), "--precision", "fp8",
                                  "--compute-capability", "8.0"])
    assert r.exit_code == 2 and "8.0, which has no FP8 tensor cores" in r.output, r.output


def _fp8_constants(plan: bytes) -> list[tuple[int, ...]]:
    """Shapes of the FP8 constant tensors in a TensorRT-RTX 1.7 engine: its embedded Myelin graph
    lists each constant as `tensor={ ... const_payload_size=.. dims={ a b } ... type=fp8_e4m3 }`.
    (TensorRT's engine inspector needs a GPU to deserialize the engine; this reads the plan's text.)"""
    pat = rb"tensor=\{ [^{}]*const_payload_size=\d+ dims=\{ ([\d ]+) \}(?:[^{}]|\{[^{}]*\})*?type=fp8_e4m3 \}"
    return [tuple(int(v) for v in m.split()) for m in re.findall(pat, plan)]


@pytest.fixture(scope="module")
def fp8_built(tiny, tmp_path_factory):
    if not HAVE_RTX:
        pytest.skip("tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    return export_tiny(tiny, tmp_path_factory, "fp8_engines", "tensorrt-rtx", "fp8",
                       ["ss_flow", "shape_lr_flow", "ss_decoder"], keep_onnx=True)


@needs_rtx
def test_tensorrt_rtx_fp8_engines(fp8_built, tiny):
    import onnx
    import tensorrt_rtx as trt
    from onnx import TensorProto as TP

    from pixal3d_rt.export.trt_build import build_engine, sha256_file

    d, manifest, log = fp8_built
    on_disk = json.loads((d / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["precision"] == "fp8" and on_disk["compute_capabilities"] == ["8.9", "12.0"]
    assert "--precision fp8" in on_disk["rebuild_command"]
    nets = on_disk["networks"]
    assert set(nets) == {"ss_flow", "shape_lr_flow", "ss_decoder"}
    for name in ("ss_flow", "shape_lr_flow"):
        e = nets[name]
        assert e["precision"] == "fp8" and e["compute_capabilities"] == ["8.9", "12.0"]
        q = e["fp8"]
        assert q["quantized_linears"] == 16 and len(q["scales"]) == 16
        assert q["calibration"]["forwards"] == fp8.CALIBRATION_POINTS and q["calibration"]["seed"] == fp8.CALIBRATION_SEED
        assert q["calibration"]["timesteps"][0] == 1000.0 and len(q["calibration"]["timesteps"]) == fp8.CALIBRATION_POINTS
        assert all(s["input_scale"] > 0 and s["input_amax"] / 448 == pytest.approx(s["input_scale"], rel=1e-2)
                   for s in q["scales"].values())
        f = d / e["file"]
        assert f.stat().st_size == e["bytes"] and sha256_file(f) == e["sha256"]
        # FP8 inside the engine: one FP8 constant per quantized weight, shaped [in, out] (TensorRT may pad a dim)
        plan = f.read_bytes()
        consts = sorted(_fp8_constants(plan))
        graph = onnx.load(str(d / "onnx" / f"{name}.onnx")).graph
        weights = sorted(tuple(i.dims) for i in graph.initializer if i.data_type == TP.FLOAT8E4M3FN and i.dims)
        assert len(consts) == len(weights) == 16
        assert all(c[0] in (w[0], w[0] + 1) and c[1] in (w[1], w[1] + 1) for c, w in zip(consts, weights)), (consts, weights)
        # the graph holds the quantized weights of the real network and the recorded activation scales
        net = tiny.load(S.ExportSpec.from_json(e["spec"]), "fp8")
        quant = fp8.quantize_linears(net, fp8.Calibration({n: s["input_amax"] for n, s in q["scales"].items()}, {}))
        _graph_checks(d / "onnx" / f"{name}.onnx", quant, TP.BFLOAT16)
    assert nets["ss_flow"]["fp8"]["calibration"]["dims"] == {"B": 2}
    assert nets["shape_lr_flow"]["fp8"]["calibration"]["dims"] == {"B": 2, "N": 4096}
    # the SS decoder stays bf16, and says so
    dec = nets["ss_decoder"]
    assert dec["precision"] == "bf16" and "fp8" not in dec and "bf16" in dec["precision_note"]
    assert not _fp8_constants((d / dec["file"]).read_bytes())
    assert any("ss_decoder" in line and "stays bf16" in line for line in log)
    assert any("ss_flow" in line and "fp8 calibration" in line for line in log)
    # TensorRT-RTX itself refuses FP8 for a GPU without it (why the defaults are 8.9, 12.0)
    spec = S.ExportSpec.from_json(nets["ss_flow"]["spec"])
    with pytest.raises(ExportError, match="sm86.*fp8"):
        build_engine(trt, d / "onnx" / "ss_flow.onnx", spec, "tensorrt-rtx", ("8.6",))
    # the parsed network: 16 Quantize layers to FP8 (the activations), 32 Dequantize layers to BF16
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    assert trt.OnnxParser(network, logger).parse_from_file(str(d / "onnx" / "ss_flow.onnx"))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    qs = [L for L in layers if L.type == trt.LayerType.QUANTIZE]
    dqs = [L for L in layers if L.type == trt.LayerType.DEQUANTIZE]
    assert len(qs) == 16 and all(L.get_output_type(0) == trt.DataType.FP8 for L in qs)
    assert len(dqs) == 32 and all(L.get_output_type(0) == trt.DataType.BF16 for L in dqs)


@needs_rtx
def test_fp8_engines_up_to_date(fp8_built, tiny):
    from pixal3d_rt.export.trt_build import export_engines

    d, manifest, _ = fp8_built
    log = []
    export_engines(tiny, "tensorrt-rtx", d, precision="fp8", only=["ss_flow", "shape_lr_flow", "ss_decoder"], progress=log.append)
    assert sum("up to date" in line for line in log) == 3, log
