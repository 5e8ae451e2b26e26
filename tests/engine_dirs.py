"""Helpers of the engine-directory tests (TensorRT engines and AOTInductor packages alike)."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")


def ort_engine(spec, path, entry=None, log=None):
    """An `Engine` that runs an ONNX file with onnxruntime on the CPU: a TensorRT engine's stand-in
    where none can run (the same inputs and outputs, bound by name). Its session plays the execution
    context: created when a stage enters (or at the first run), released when a stage leaves without
    keeping it. `entry`: a manifest entry (`weights`, `weight_streaming`); `log` gets
    ("enter", name, weight_bytes), ("run", name), ("leave", name, keep)."""
    import onnxruntime as ort
    import torch

    from pixal3d_rt.runtime.engine import Engine
    from pixal3d_rt.runtime.planner import NetworkSize

    entry = entry or {}

    class OrtEngine(Engine):
        def __init__(self):
            self.spec, self.path = spec, path
            self.weights = NetworkSize(**entry["weights"]) if "weights" in entry else None
            self.streaming = bool(entry.get("weight_streaming", False))
            self.log = log if log is not None else []
            self.sess = None
            self.weight_bytes = None  # what the last stage gave the weights (None: all)

        def enter_stage(self, weight_bytes=None):
            self.log.append(("enter", spec.name, weight_bytes))
            self.weight_bytes = weight_bytes
            if self.sess is None:
                self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def leave_stage(self, keep):
            self.log.append(("leave", spec.name, keep))
            if not keep:
                self.sess = None

        def run(self, inputs):
            if self.sess is None:
                self.enter_stage()
            self.log.append(("run", spec.name))
            outs = self.sess.run(None, {k: v.contiguous().numpy() for k, v in inputs.items()})
            return {t.name: torch.from_numpy(o) for t, o in zip(self.spec.outputs, outs)}

    return OrtEngine()


def one_network_copy(src: Path, dst: Path, name: str, file: str) -> Path:
    """A private copy of engine directory `src` at `dst` holding network `name` (its `file`) only."""
    dst.mkdir()
    shutil.copy(src / file, dst / file)
    m = json.loads((src / "manifest.json").read_text())
    m["networks"] = {name: m["networks"][name]}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def export_tiny(tiny, tmp_path_factory, folder: str, target: str, precision: str, only: list[str], **kw):
    """Export `only` of the tiny preset into a fresh folder: (folder, manifest, progress lines)."""
    from pixal3d_rt.export.trt_build import export_engines

    d = tmp_path_factory.mktemp(folder)
    log = []
    manifest = export_engines(tiny, target, d, precision=precision, only=only, progress=log.append, **kw)
    return d, manifest, log
