"""ONNX export of an export spec from the network's one definition, and its onnxruntime check.

Exporter: torch.export-based (`torch.onnx.export(dynamo=True)`, needs `onnxscript`). It traces
the real modules with symbolic B and N (the spec's dynamic axes become `torch.export.Dim`s with
the profile's bounds), so every reshape and SDPA stays valid at any token count; SDPA is written
as MatMul-Softmax-MatMul, the pattern TensorRT fuses into its attention kernels. The legacy
TorchScript exporter is not used: it is deprecated and bakes `h.shape[-1:]`-style sizes into
constants where the networks read shapes from tensors.

Weights larger than `EXTERNAL_DATA_BYTES` are written as external data next to the .onnx file
(the 2 GiB protobuf limit; a 1.4 B-parameter flow is 2.8 GB in bf16).
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from pixal3d_rt.errors import Pixal3DError
from pixal3d_rt.runtime.specs import ExportSpec

from .modules import eager_outputs, example_inputs, export_module

OPSET = 20
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(Pixal3DError):
    """An export or engine build cannot be done; one line naming the network and the remedy."""


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{what} needs the '{module}' package: pip install 'pixal3d-rt[export]'") from None


def trace_dims(spec: ExportSpec) -> dict:
    """Example sizes to trace with: B = 2 and a small N that is neither 0/1 (torch.export would
    specialise on those) nor equal to another static size of the graph."""
    if not spec.profiles:
        return {}
    dims = {}
    for axis, (lo, opt, hi) in spec.profiles[0].axes.items():
        want = 2 if axis == "B" else 37
        dims[axis] = max(lo, min(want, hi))
    return dims


def dynamic_shapes(spec: ExportSpec) -> dict | None:
    """{input name: {axis index: torch.export.Dim}} spanning every profile of the spec (None if static)."""
    if not spec.profiles:
        return None
    from torch.export import Dim

    lo = {a: min(p.axes[a][0] for p in spec.profiles) for a in spec.profiles[0].axes}
    hi = {a: max(p.axes[a][2] for p in spec.profiles) for a in spec.profiles[0].axes}
    dims = {a: Dim(a, min=lo[a], max=hi[a]) for a in lo}
    return {t.name: ({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None) for t in spec.inputs}


def trace_inputs(spec: ExportSpec, network: nn.Module) -> tuple:
    """The example inputs to trace with (at `trace_dims`), in spec order, on the network's device."""
    inputs, _ = example_inputs(spec, trace_dims(spec), torch.Generator().manual_seed(0))
    device = next(iter(network.parameters())).device
    return tuple(inputs[t.name].to(device) for t in spec.inputs)


@contextmanager
def quiet_exporters():
    """Silence the exporters' warnings and INFO logs (they print pages per network); errors still raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch._inductor", "onnxscript")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)


def param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@torch.no_grad()
def export_onnx(spec: ExportSpec, network: nn.Module, path: Path, external_data: bool | None = None) -> dict:
    """Write `path` (.onnx, plus `path.data` when external) for `spec` from `network`; returns
    {"seconds", "bytes", "external_data"}. The network's dtype (fp32 / bf16 torso) is exported as is."""
    _require("onnxscript", "ONNX export")
    onnx = _require("onnx", "ONNX export")
    path = Path(path)
    module = export_module(spec, network)
    args = trace_inputs(spec, network)
    if external_data is None:
        external_data = param_bytes(network) > EXTERNAL_DATA_BYTES
    t0 = time.perf_counter()
    with quiet_exporters():
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs], dynamic_shapes=dynamic_shapes(spec),
            opset_version=OPSET, optimize=True, verbose=False, report=False,
        )
        program.save(str(path), external_data=external_data)
        del program
    seconds = time.perf_counter() - t0
    onnx.checker.check_model(str(path), full_check=False)  # by path: works past the 2 GiB protobuf limit
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return {"seconds": round(seconds, 2), "bytes": size, "external_data": bool(external_data)}


def relative_errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.double(), ref.double()
    d = got - ref
    return {"rel_l2": float(d.norm() / ref.norm().clamp_min(1e-30)),
            "max_rel": float(d.abs().max() / ref.abs().max().clamp_min(1e-30))}


@torch.no_grad()
def check_onnxruntime(spec: ExportSpec, network: nn.Module, path: Path, dims_list: list[dict], seed: int = 0) -> list[dict]:
    """Run the .onnx with onnxruntime (CPU) at each `dims` and compare with the eager path.
    Returns one record per dims: {"dims", "rel_l2", "max_rel"} (max_rel = max|Δ| / max|ref|)."""
    ort = _require("onnxruntime", "the onnxruntime check")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    records = []
    for dims in dims_list:
        inputs, coords = example_inputs(spec, dims, gen)
        ref = eager_outputs(spec, network, inputs, coords)
        outs = sess.run([t.name for t in spec.outputs], {t.name: inputs[t.name].numpy() for t in spec.inputs})
        for t, got in zip(spec.outputs, outs):
            records.append({"dims": dict(dims), "output": t.name, **relative_errors(torch.from_numpy(got), ref[t.name])})
    return records
