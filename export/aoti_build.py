"""`pixal3d-rt export --target aoti`: AOTInductor packages (`<spec>.pt2`) of the stage networks.

The same specs and export modules as the ONNX path (one model definition): `torch.export` traces
the export module with the spec's dynamic B / N, and `torch._inductor.aoti_compile_and_package`
compiles the graph with its weights into one `.pt2` file (a zip with a shared library), which
`runtime/aoti_engine.py` loads without Python model code or a compiler. `export_engines` drives
it like the TensorRT targets: one network at a time, built in a private folder of the engine
directory and renamed into place, recorded in the same manifest, skipped when up to date.

A package holds machine code for one device: it is compiled for the device the command runs on
(cuda when available, else cpu; `--device` picks), its kernels for that GPU's compute capability
(cuda) or this CPU's instruction-set extensions (cpu: inductor compiles with -march=native). Its
shared library links against libtorch, so it is tied to the torch version it was built with.
Precisions are the TensorRT ones (`set_precision`: bf16/fp16 mixed, fp32); inductor compiles bf16
and fp16 on the CPU as well.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pixal3d_rt.runtime.aoti_engine import cpu_isa, first_line
from pixal3d_rt.runtime.specs import ExportSpec

from .modules import export_module
from .onnx_export import ExportError, dynamic_shapes, quiet_exporters, trace_inputs

AOTI_EXPORTER = "pixal3d-rt aoti 1 (torch.export + aoti_compile_and_package)"
AOTI_PRECISIONS = ("bf16", "fp16", "fp32")


def check_aoti_request(precision: str) -> None:
    """Reject a precision AOTInductor packages cannot be built in, before any weights are read."""
    if precision == "fp8":
        raise ExportError("--target aoti --precision fp8 is not available: inductor has no calibrated FP8 path for "
                          "these networks; use --precision bf16, fp16 or fp32 (or an fp8 TensorRT target)")
    if precision not in AOTI_PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} for --target aoti (known: {', '.join(AOTI_PRECISIONS)})")


def resolve_device(device: str | None) -> str:
    """The device kind to compile for ("cuda" or "cpu"): the requested one, else cuda when a GPU is visible."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ExportError(f"--device {device}: AOTInductor packages are built for cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ExportError("--target aoti --device cuda: no CUDA GPU is visible to PyTorch; packages are compiled on "
                          "the GPU they run on (use --device cpu for CPU packages)")
    return kind


def aoti_target(device: str | None = None):
    """The `Target` of `export_engines` for AOTInductor packages on `device`."""
    from .trt_build import Target

    dev = resolve_device(device)
    where = {"torch_version": torch.__version__, "device": dev}
    if dev == "cuda":
        major, minor = torch.cuda.get_device_capability()
        where |= {"gpu": torch.cuda.get_device_name(), "compute_capabilities": [f"{major}.{minor}"]}
    else:
        where |= cpu_isa() | {"compute_capabilities": []}  # the code uses this CPU's instruction-set extensions
    tied_to = {"torch": torch.__version__, "device": dev, "exporter": AOTI_EXPORTER,
               "where": where.get("compute_capabilities") or where.get("cpu_features") or where.get("cpu_capability")}

    def build(spec: ExportSpec, load, work: Path, say):
        net = load().to(dev)
        module = export_module(spec, net)
        args = trace_inputs(spec, net)
        ds = dynamic_shapes(spec)
        say(f"torch.export ({dev})")
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), quiet_exporters():
                program = torch.export.export(module, args, dynamic_shapes=ds and tuple(ds[t.name] for t in spec.inputs))
        except Exception as e:
            raise ExportError(f"{spec.name}: torch.export failed: {first_line(e)}") from e
        export_s = time.perf_counter() - t0
        del module, net, args  # the program holds the weights from here on
        say(f"exported in {export_s:.1f} s; compiling with AOTInductor")
        path = work / f"{spec.name}.pt2"
        t0 = time.perf_counter()
        try:
            with quiet_exporters():
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as e:
            hint = " (CPU packages need a C++ compiler: install g++)" if dev == "cpu" else ""
            raise ExportError(f"{spec.name}: AOTInductor compile failed{hint}: {first_line(e)}") from e
        compile_s = time.perf_counter() - t0
        del program
        if dev == "cuda":
            torch.cuda.empty_cache()
        return path, {"export_seconds": round(export_s, 2), "build_seconds": round(compile_s, 2)}

    return Target("aoti", ".pt2", tied_to, header=dict(where), entry=where | {"exporter": AOTI_EXPORTER},
                  build=build, rebuild_args=f" --device {dev}")
