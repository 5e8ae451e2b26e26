"""FP8 (E4M3) export of the flow transformers: calibration, quantized weights, QDQ in the ONNX graph.

`--precision fp8` quantizes the heavy GEMMs of the flow transformers: every nn.Linear inside the
blocks (self-attention qkv/out, cross-attention q/kv/out, the projection-conditioning linear, the
MLP), except the per-block adaLN Linears (1–2 rows per call: no GEMM to speed up). Everything else is
the bf16 export unchanged: norms, RoPE, attention matmuls, time embedding, input/output layers.
The SS decoder and DINOv3 stay bf16.

* Weights: per-output-channel scale = max|W[o, :]| / 448, W stored as FLOAT8E4M3FN.
* Activations: per-tensor scale = amax / 448 of the Linear's input, calibrated by running the eager
  network (the same wrapper that is exported) on seeded N(0, 1) latents and conditions at the
  stage sampler's timesteps, both CFG halves (row 1 is the all-zero unconditional condition); on the
  GPU when one is visible, else on the CPU in fp32 (see `calibrate`). The inputs are synthetic: real
  image conditions with larger outliers than calibrated are clipped at 448·scale.
* Scales are rounded to bf16 (DequantizeLinear outputs the scale's dtype, and the MatMul it feeds
  takes bf16 in a strongly typed network); the fake-quantized torch reference uses the same values.

ONNX: the bf16 graph is exported as for `--precision bf16`, then each quantized Linear's MatMul gets
`x -> QuantizeLinear(s_x, zero point FLOAT8E4M3FN 0) -> DequantizeLinear(s_x)` on its input and
`W_fp8 [in, out] -> DequantizeLinear(s_w, axis=1)` as its weight (opset 19+ Q/DQ: explicit
quantization, the pattern TensorRT fuses into an FP8 GEMM). MatMuls are mapped to Linears by the
exporter's name scopes (node metadata `pkg.torch.onnx.name_scopes`) and each mapping is checked
bitwise against the module's weight; a Linear that maps to no MatMul, or to more than one, fails.
"""
from __future__ import annotations

import ast
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pixal3d_rt.runtime.specs import ExportSpec

from .modules import example_inputs, export_module
from .onnx_export import ExportError, _require

E4M3_MAX = 448.0  # largest finite FLOAT8E4M3FN value
FP8_KINDS = ("dense_flow", "sparse_flow")  # what fp8 applies to; the other networks stay bf16
FP8_BASE_PRECISION = "bf16"  # the unquantized part of an fp8 export (and the other networks)
# FP8 tensor cores: Ada (8.9) and Blackwell (12.0) among TensorRT-RTX's targets; Hopper (9.0) for full TensorRT
FP8_RTX_COMPUTE_CAPABILITIES = ("8.9", "12.0")
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)

CALIBRATION_POINTS = 4  # timesteps of the stage's 12-step schedule, evenly spread, first and last included
CALIBRATION_MAX_TOKENS = 4096  # sparse flows: N of the calibration inputs (min(opt, this)); CPU time
CALIBRATION_SEED = 0
STAGE_OF_SPEC = {"ss_flow": "sparse_structure", "shape_lr_flow": "shape_slat", "shape_hr_flow": "shape_slat",
                 "tex_flow": "tex_slat"}
UNCOND_INPUTS = ("cond_global", "cond_proj")  # zero in the unconditional CFG half (pipeline neg_cond)


def quantized_linear_names(flow: nn.Module) -> list[str]:
    """Names (relative to the flow) of the Linears fp8 quantizes: the block GEMMs."""
    return [n for n, m in flow.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("blocks.") and ".adaLN_modulation" not in n]


def to_bf16_value(x: torch.Tensor) -> torch.Tensor:
    """fp32 tensor holding the bf16-rounded values (what the graph's bf16 scales represent)."""
    return x.float().to(torch.bfloat16).float()


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear (saturating, round to nearest even) then DequantizeLinear, in x's dtype.
    `scale` broadcasts against x (a scalar, or [out, 1] for per-output-channel weights)."""
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# calibration


@dataclass
class Calibration:
    input_amax: dict  # Linear name -> max |input| over every calibration input
    settings: dict  # what was run (recorded in the manifest)


def calibration_timesteps(spec: ExportSpec, points: int = CALIBRATION_POINTS) -> list[float]:
    """Model-time values (1000·t) at which the stage's sampler calls the network, `points` of them."""
    from pixal3d_rt.config import sampler_params
    from pixal3d_rt.sampler import t_schedule

    p = sampler_params(STAGE_OF_SPEC[spec.name])
    ts = t_schedule(int(p["steps"]), float(p["rescale_t"]))[:-1]  # t = 0 is never evaluated
    points = max(1, min(points, len(ts)))
    idx = sorted({round(i * (len(ts) - 1) / max(points - 1, 1)) for i in range(points)})
    return [1000.0 * ts[i] for i in idx]


@torch.no_grad()
def calibrate(spec: ExportSpec, net: nn.Module, points: int = CALIBRATION_POINTS,
              max_tokens: int = CALIBRATION_MAX_TOKENS, seed: int = CALIBRATION_SEED, device=None) -> Calibration:
    """Per-tensor amax of every quantized Linear's input, from the eager network (in its export
    precision) run through the exported wrapper at the stage's timesteps, batch = the CFG halves."""
    if spec.kind not in FP8_KINDS:
        raise ExportError(f"{spec.name}: fp8 calibration is for the flow transformers, not {spec.kind}")
    names = quantized_linear_names(net)
    mods = dict(net.named_modules())
    amax = {n: 0.0 for n in names}

    def hook(name):
        def record(mod, args):
            amax[name] = max(amax[name], float(args[0].detach().abs().max()))
        return record

    dims = spec.profiles[0].dims("opt") if spec.profiles else {}
    dims["B"] = 2  # conditional + unconditional half
    if "N" in dims:
        dims["N"] = max(1, min(int(dims["N"]), max_tokens))
    home = next(iter(net.parameters())).device
    dev = torch.device(device) if device is not None else (torch.device("cuda") if torch.cuda.is_available() else home)
    torso = net.dtype
    # CPUs without bf16 units run bf16 GEMMs ~5x slower than fp32 (10.7 vs 50 GFLOP/s a core measured on
    # the CI machine): calibrate in fp32 there. bf16 -> fp32 -> bf16 is exact, and the amax moves by
    # bf16 rounding (~0.4 %), far below an E4M3 step (6 %).
    compute = torch.float32 if dev.type == "cpu" else torso
    net.convert_to(compute)
    module = export_module(spec, net).to(dev)
    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    gen = torch.Generator().manual_seed(seed)
    steps = calibration_timesteps(spec, points)
    t0 = time.perf_counter()
    try:
        for t in steps:
            inputs, _ = example_inputs(spec, dims, gen)
            inputs["t"] = torch.full((2,), t)
            for k in UNCOND_INPUTS:
                inputs[k][1] = 0
            module(*(inputs[x.name].to(dev) for x in spec.inputs))
    finally:
        for h in handles:
            h.remove()
        module.to(home)
        net.convert_to(torso)
    bad = [n for n, a in amax.items() if not (a > 0 and a < float("inf"))]
    if bad:
        raise ExportError(f"{spec.name}: fp8 calibration saw a zero or non-finite input amax at {', '.join(bad[:3])}; "
                          "the network's weights are broken (NaN/inf) or the calibration inputs never reach it")
    settings = {"inputs": "seeded N(0,1) latents and conditions; batch row 1 = the all-zero unconditional condition",
                "seed": seed, "timesteps": [round(t, 3) for t in steps], "stage": STAGE_OF_SPEC[spec.name],
                "dims": dims, "forwards": len(steps), "device": str(dev), "compute_dtype": str(compute).replace("torch.", ""),
                "seconds": round(time.perf_counter() - t0, 2),
                "activation_scale": "per-tensor amax / 448 (bf16)", "weight_scale": "per-output-channel amax / 448 (bf16)"}
    return Calibration(amax, settings)


def check_compute_capabilities(caps, target: str) -> None:
    """FP8 engines need FP8 tensor cores: fail before any weights are read if a target GPU lacks them."""
    for cc in caps:
        major, minor = (int(v) for v in str(cc).split("."))
        if (major, minor) < FP8_MIN_COMPUTE_CAPABILITY:
            where = ("this GPU is" if target == "tensorrt" else f"--compute-capability {cc} is")
            raise ExportError(f"--precision fp8: {where} compute capability {cc}, which has no FP8 tensor cores "
                              f"(FP8 needs 8.9 Ada, 9.0 Hopper or 12.0 Blackwell; TensorRT-RTX builds "
                              f"{', '.join(FP8_RTX_COMPUTE_CAPABILITIES)}); build bf16 engines for it")


def settings_key(points: int = CALIBRATION_POINTS, max_tokens: int = CALIBRATION_MAX_TOKENS,
                 seed: int = CALIBRATION_SEED) -> str:
    """What decides the fp8 artifact besides the weights (goes into the engine fingerprint)."""
    return f"fp8-e4m3 v1 points={points} max_tokens={max_tokens} seed={seed}"


# ---------------------------------------------------------------------------------------------
# quantization


@dataclass
class LinearQuant:
    input_scale: torch.Tensor  # fp32 scalar, bf16-representable
    weight_fp8: torch.Tensor  # [out, in] float8_e4m3fn (nn.Linear's layout)
    weight_scale: torch.Tensor  # [out] fp32, bf16-representable

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [out, in] as the graph computes it (in `dtype`)."""
        return (self.weight_fp8.float() * self.weight_scale[:, None]).to(dtype)


def quantize_linears(net: nn.Module, calib: Calibration) -> dict:
    """{Linear name: LinearQuant} for every quantized Linear of `net`."""
    mods = dict(net.named_modules())
    out = {}
    for name in quantized_linear_names(net):
        w = mods[name].weight.detach().float().cpu()
        # a zero row would give scale 0 (0/0 in Q); any tiny positive scale quantizes it to zeros
        ws = to_bf16_value(w.abs().amax(dim=1).clamp_min(1e-30) / E4M3_MAX)
        w8 = (w / ws[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        xs = to_bf16_value(torch.tensor(calib.input_amax[name] / E4M3_MAX))
        out[name] = LinearQuant(xs, w8, ws)
    return out


@contextmanager
def fake_quantized(net: nn.Module, quant: dict):
    """The eager network computing what the fp8 graph computes: quantized Linears take QDQ'd inputs
    and the dequantized weights. Restores the network afterwards."""
    mods = dict(net.named_modules())
    saved, handles = {}, []
    try:
        for name, q in quant.items():
            lin = mods[name]
            saved[name] = lin.weight.data
            lin.weight.data = q.weight(lin.weight.dtype).to(lin.weight.device)
            handles.append(lin.register_forward_pre_hook(
                lambda m, args, s=q.input_scale: (fp8_qdq(args[0], s.to(args[0].device)), *args[1:])))
        yield net
    finally:
        for h in handles:
            h.remove()
        for name, w in saved.items():
            mods[name].weight.data = w


# ---------------------------------------------------------------------------------------------
# the ONNX graph


def _onnx_consts():
    onnx = _require("onnx", "the fp8 export")
    TP = onnx.TensorProto
    return onnx, TP, {TP.FLOAT: torch.float32, TP.BFLOAT16: torch.bfloat16, TP.FLOAT16: torch.float16}


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


def _initializer_bytes(init) -> bytes:
    if init.HasField("raw_data") or init.raw_data:
        return bytes(init.raw_data)
    from onnx import numpy_helper

    return numpy_helper.to_array(init).tobytes()


def _name_scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return list(ast.literal_eval(p.value))
    return []


def map_linears(model, net: nn.Module, prefix: str, names: list[str]) -> dict:
    """{Linear name: (MatMul/Gemm node, weight initializer name, quantization axis of that initializer)},
    each mapping checked bitwise against the module's weight. Fails on a missing or ambiguous Linear."""
    onnx, TP, TORCH = _onnx_consts()
    inits = {i.name: i for i in model.graph.initializer}
    mods = dict(net.named_modules())
    wanted = {prefix + n: n for n in names}
    found, scoped = {}, 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = _name_scopes(node)
        scoped += bool(scopes)
        hits = [wanted[s] for s in scopes if s in wanted]
        if not hits:
            continue
        name = hits[-1]
        if name in found:
            raise ExportError(f"fp8: Linear {name} lowered to more than one MatMul ({found[name][0].name}, {node.name}); "
                              "cannot place its quantization")
        winit = inits.get(node.input[1])
        if winit is None:
            raise ExportError(f"fp8: the weight of {name} ({node.name} input {node.input[1]!r}) is not an initializer")
        w = mods[name].weight.detach().cpu()
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            raise ExportError(f"fp8: {node.name} (Linear {name}) is a Gemm with transA=1; cannot quantize it")
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            want, axis = w, 0  # Gemm(x, W, transB=1): W [out, in]
        else:
            want, axis = w.t(), 1  # MatMul(x, W^T): W^T [in, out], output channels on axis 1
        dtype = TORCH.get(winit.data_type)
        if (dtype is None or list(winit.dims) != list(want.shape)
                or _initializer_bytes(winit) != _raw(want.to(dtype))):
            raise ExportError(f"fp8: {node.name} sits in the scope of Linear {name} but its weight {winit.name} "
                              f"{list(winit.dims)} is not that Linear's weight {list(want.shape)}")
        found[name] = (node, winit.name, axis)
    missing = [n for n in names if n not in found]
    if missing:
        why = "" if scoped else " (the exporter wrote no name scopes into the node metadata)"
        raise ExportError(f"fp8: {len(missing)} of {len(names)} Linears have no MatMul in the ONNX graph{why}: "
                          f"{', '.join(missing[:4])}")
    return found


def insert_qdq(onnx_path: Path, spec: ExportSpec, net: nn.Module, quant: dict) -> dict:
    """Rewrite `onnx_path` in place with fp8 QDQ on every quantized Linear (see the module docstring).
    Works on the bf16 graph (bf16 scales) and on an fp32 graph (fp32 scales; onnxruntime runs it)."""
    onnx, TP, TORCH = _onnx_consts()
    from onnx import helper

    onnx_path = Path(onnx_path)
    data_file = onnx_path.parent / (onnx_path.name + ".data")
    external = data_file.exists()
    model = onnx.load(str(onnx_path))  # with its external data: the whole graph is rewritten
    wrapper = export_module(spec, net)
    prefix = next(n for n, m in wrapper.named_modules() if m is net)
    prefix = prefix + "." if prefix else ""
    found = map_linears(model, net, prefix, list(quant))
    inits = {i.name: i for i in model.graph.initializer}

    # Q/DQ with FLOAT8E4M3FN needs the opset 19 versions of the operators
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 19:
        raise ExportError(f"{spec.name}: fp8 Q/DQ needs ONNX opset 19 or later")

    before, placed = {}, []  # node name -> Q/DQ nodes to insert before it; (name, base, axis, scale dtype)
    for name, (node, wname, axis) in found.items():
        base = f"{prefix}{name}"
        x, xq, xdq, wdq = node.input[0], f"{base}.input_q", f"{base}.input_dq", f"{base}.weight_dq"
        before[node.name] = [
            helper.make_node("QuantizeLinear", [x, f"{base}.input_scale", f"{base}.input_zero_point"], [xq],
                             name=f"{base}/input_quantize", saturate=1),
            helper.make_node("DequantizeLinear", [xq, f"{base}.input_scale"], [xdq], name=f"{base}/input_dequantize"),
            helper.make_node("DequantizeLinear", [f"{base}.weight_fp8", f"{base}.weight_scale"], [wdq],
                             name=f"{base}/weight_dequantize", axis=axis),
        ]
        node.input[0], node.input[1] = xdq, wdq
        placed.append((name, base, axis, inits[wname].data_type))  # scales in the MatMul's dtype: DQ outputs it
    nodes = []
    for node in model.graph.node:
        nodes += before.get(node.name, [])
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # drop the replaced weights before adding the fp8 ones (a full-size flow holds 2.8 GB of them)
    used = {i for n in model.graph.node for i in n.input}
    for k in reversed(range(len(model.graph.initializer))):
        if model.graph.initializer[k].name not in used:
            del model.graph.initializer[k]
    del inits
    fp8_bytes = 0
    for name, base, axis, sdt in placed:
        q = quant[name]
        w8 = q.weight_fp8 if axis == 0 else q.weight_fp8.t()
        model.graph.initializer.extend([
            helper.make_tensor(f"{base}.weight_fp8", TP.FLOAT8E4M3FN, list(w8.shape), _raw(w8), raw=True),
            helper.make_tensor(f"{base}.weight_scale", sdt, list(q.weight_scale.shape), _raw(q.weight_scale.to(TORCH[sdt])), raw=True),
            helper.make_tensor(f"{base}.input_scale", sdt, [], _raw(q.input_scale.to(TORCH[sdt])), raw=True),
            helper.make_tensor(f"{base}.input_zero_point", TP.FLOAT8E4M3FN, [], b"\x00", raw=True),
        ])
        fp8_bytes += w8.numel()

    onnx_path.unlink()
    if external:
        data_file.unlink()
    onnx.save_model(model, str(onnx_path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_file.name, size_threshold=1024)
    del model
    onnx.checker.check_model(str(onnx_path), full_check=False)  # by path: works past the 2 GiB protobuf limit
    size = onnx_path.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)
    return {"quantized_linears": len(found), "fp8_weight_bytes": int(fp8_bytes), "onnx_bytes": size}


def export_fp8(spec: ExportSpec, net: nn.Module, onnx_path: Path, say=print) -> dict:
    """Calibrate `net` (the bf16 export network), quantize its block Linears, and turn the exported
    bf16 ONNX at `onnx_path` into the fp8 graph. Returns the manifest record of the quantization."""
    calib = calibrate(spec, net)
    quant = quantize_linears(net, calib)
    say(f"fp8 calibration: {calib.settings['forwards']} forwards at {calib.settings['dims']} "
        f"on {calib.settings['device']} in {calib.settings['seconds']:.1f} s; inserting Q/DQ on {len(quant)} Linears")
    info = insert_qdq(onnx_path, spec, net, quant)
    scales = {n: {"input_amax": calib.input_amax[n], "input_scale": float(q.input_scale)} for n, q in quant.items()}
    digest = hashlib.sha256(json.dumps(scales, sort_keys=True).encode()).hexdigest()
    return {"format": "FLOAT8E4M3FN (E4M3, saturating), ONNX QuantizeLinear/DequantizeLinear (opset 19+)",
            "scope": "flow block Linears (attention qkv/out, cross-attention q/kv/out, projection, MLP); "
                     "adaLN, norms, RoPE, attention matmuls, time embedding, input/output layers stay bf16/fp32",
            "calibration": calib.settings, "scales_sha256": digest, "scales": scales, **info}
