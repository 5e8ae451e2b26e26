"""`pixal3d-rt export`: ONNX -> TensorRT / TensorRT-RTX engines, one network at a time
(`--target aoti`: AOTInductor packages through the same loop, see aoti_build.py).

For each spec: load that one network (streamed from the fp32 checkpoint straight into the target
precision, so only one network is ever in host memory), export ONNX into a private temporary
folder of the engine directory, build the engine, write it as `<spec>.engine` through a temporary
file and a rename, then record it in `manifest.json` (also written through a rename) and free
everything before the next network. An interrupt or a failure leaves the previous engine (or none)
and no partial file. A network whose manifest entry matches the fingerprint of what would be
built (spec, precision, target, TensorRT version, compute capabilities, source checkpoint hashes,
exporter version) and whose engine file still has the recorded hash is skipped.

Precision: TensorRT-RTX networks are strongly typed, so the engine computes in the dtypes of the
exported graph: `bf16`/`fp16` export the flows with upstream's mixed precision (block Linears and
activations in bf16/fp16, norms, RoPE, time embedding, input/output layers in fp32), the SS decoder
with its fp16 torso (upstream's `use_fp16`), DINOv3 wholly in bf16/fp16; `fp32` exports fp32.
`fp8` exports the bf16 graph with the flows' block Linears in FP8 E4M3 (calibrated quantize/dequantize
nodes, see fp8.py; engines for compute capability 8.9+); the SS decoder and DINOv3 stay bf16.

Weight streaming (on by default for the flow transformers, `weight_streaming=False` /
`--no-weight-streaming` to leave it out): the flows are built with TensorRT's WEIGHT_STREAMING flag,
so that at run time a memory plan can keep only part of their weights on the device and TensorRT
streams the rest from host memory (runtime/tensorrt_engine.py). Each manifest entry records whether
its engine streams (`weight_streaming`) and the network's weight sizes as exported (`weights`: all,
the largest block, the rest, the number of blocks), which the planner reads without a GPU.
"""
from __future__ import annotations

import copy
import datetime as _dt
import gc
import hashlib
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pixal3d_rt.files import atomic_write_bytes, private_dir, remove_stale
from pixal3d_rt.runtime.tensorrt_engine import MANIFEST, MANIFEST_FORMAT, EngineError, read_manifest, sha256_file  # one definition of the format
from pixal3d_rt.runtime.planner import network_size
from pixal3d_rt.runtime.specs import ExportSpec, build_specs

from . import fp8
from .onnx_export import OPSET, ExportError, export_onnx

EXPORTER_VERSION = f"pixal3d-rt export 1 (torch.onnx dynamo, opset {OPSET})"
TARGETS = ("tensorrt-rtx", "tensorrt", "aoti")
PRECISIONS = ("bf16", "fp16", "fp32", "fp8")
# TensorRT-RTX engines run on Ampere (consumer and A100), Ada and Blackwell; it refuses Hopper
RTX_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0")

# the networks built with weight streaming: the 1.3 B-parameter transformers a small budget streams
STREAMED_KINDS = ("dense_flow", "sparse_flow")

FLOW_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def trt_module(target: str):
    """The Python module of a target: `tensorrt_rtx` or `tensorrt`, with an install hint if absent."""
    name = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}.get(target)
    if name is None:
        raise ExportError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    try:
        import importlib

        return importlib.import_module(name)
    except ImportError:
        hint = ("pip install tensorrt-rtx" if target == "tensorrt-rtx"
                else "pip install tensorrt (NVIDIA's wheels; the build needs an NVIDIA GPU)")
        raise ExportError(f"--target {target} needs the '{name}' Python package: {hint}") from None


# ---------------------------------------------------------------------------------------------
# files


def previous_manifest(engine_dir: Path) -> dict:
    """The manifest of an earlier build in `engine_dir`, or {} when there is none the runtime would accept."""
    try:
        return read_manifest(engine_dir)
    except EngineError:
        return {}  # a manifest we cannot read is rebuilt from scratch


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(engine_dir) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------
# sources: a weights directory (streamed network by network) or an in-memory preset


@dataclass
class Source:
    """Where networks come from. `configs`/`dino_config`/`geometry` describe every network without
    loading one; `load(key, precision)` returns one network in the export precision."""

    label: str  # for messages and the rebuild command
    cli_args: str  # "--weights DIR" / "--preset tiny"
    configs: dict
    dino_config: dict
    geometry: object
    weights_dir: Path | None = None
    preset: object = None  # checkpoints.Weights of a preset

    @classmethod
    def from_preset(cls, name: str) -> "Source":
        from pixal3d_rt.presets import build_preset

        w, geometry = build_preset(name)
        return cls(f"preset:{name}", f"--preset {name}", dict(w.configs), dict(w.dinov3_config), geometry, preset=w)

    @classmethod
    def from_weights(cls, weights) -> "Source":
        """A weights directory or Hugging Face id (checkpoints.locate_weights)."""
        from pixal3d_rt import config as C
        from pixal3d_rt.checkpoints import PIPELINE_MODELS, _network_config, _read_json, locate_weights

        files = locate_weights(weights)
        configs = {key: _network_config(base, PIPELINE_MODELS[key]) for key, base in files.models.items()}
        dino_config = _read_json(files.dinov3_dir / "config.json")
        root = files.pipeline_json.parent
        src = cls(files.source, f"--weights {shlex.quote(files.source)}", configs, dino_config, C.FULL, weights_dir=root)
        src._bases, src._dino_dir = dict(files.models), files.dinov3_dir
        return src

    # -- files and hashes --------------------------------------------------------------------

    def files(self, model_key: str) -> list[Path]:
        if self.weights_dir is None:
            return []
        if model_key == "dinov3":
            return [self._dino_dir / "config.json", self._dino_dir / "model.safetensors"]
        b = self._bases[model_key]
        return [b.parent / (b.name + ".json"), b.parent / (b.name + ".safetensors")]

    def hashes(self, model_key: str, memo: dict) -> dict:
        """{file name: {"sha256", "bytes", "mtime_ns"}}; a file whose size and mtime match `memo`
        (the last manifest) is not re-read (hashing 24 GB takes minutes)."""
        if self.preset is not None:
            net = self._preset_network(model_key)
            h = hashlib.sha256()
            for k, v in net.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
            cfg = self.dino_config if model_key == "dinov3" else self.configs[model_key]
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            return {self.label + ":" + model_key: {"sha256": h.hexdigest()}}
        out = {}
        for f in self.files(model_key):
            if not f.is_file():
                from pixal3d_rt.errors import CheckpointError

                raise CheckpointError(f"{f}: file not found")
            st = f.stat()
            rel = str(f.relative_to(self.weights_dir)) if f.is_relative_to(self.weights_dir) else str(f)
            old = memo.get(rel, {})
            if old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and "sha256" in old:
                out[rel] = old
            else:
                out[rel] = {"sha256": sha256_file(f), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        return out

    # -- networks ----------------------------------------------------------------------------

    def _preset_network(self, model_key: str) -> nn.Module:
        return self.preset.dinov3 if model_key == "dinov3" else self.preset.models[model_key]

    def load(self, spec: ExportSpec, precision: str) -> nn.Module:
        """One network, in eval mode, in the export precision (a copy for presets)."""
        if precision == "fp8":  # the bf16 network: fp8 quantizes the flows' block Linears in the graph
            precision = fp8.FP8_BASE_PRECISION
        if self.preset is not None:
            net = copy.deepcopy(self._preset_network(spec.model_key))
            return set_precision(spec, net, precision)
        from pixal3d_rt.checkpoints import PIPELINE_MODELS, load_dinov3, load_network

        if spec.model_key == "dinov3":
            net, _ = load_dinov3(self._dino_dir, device="cpu")
            return set_precision(spec, net, precision)
        dtype = FLOW_DTYPE[precision]
        if spec.kind == "ss_decoder":
            dtype = "float32" if precision == "fp32" else "float16"  # upstream's fp16 torso (use_fp16)
        net, _ = load_network(self._bases[spec.model_key], PIPELINE_MODELS[spec.model_key], "cpu", dtype)
        return net


def set_precision(spec: ExportSpec, net: nn.Module, precision: str) -> nn.Module:
    """Put a built network into the export precision (see the module docstring)."""
    if spec.kind in ("dense_flow", "sparse_flow"):
        net.convert_to(FLOW_DTYPE[precision])
    elif spec.kind == "ss_decoder":
        net.convert_to_fp32() if precision == "fp32" else net.convert_to_fp16()
    elif spec.kind == "dinov3":
        net.to(TORCH_DTYPE[precision])
    return net.eval()


# ---------------------------------------------------------------------------------------------
# engine build


def _parse_cc(cc: str, trt):
    name = "SM" + cc.replace(".", "")
    if not hasattr(trt, "ComputeCapability") or not hasattr(trt.ComputeCapability, name):
        known = [m for m in getattr(trt, "ComputeCapability", type("x", (), {"__members__": {}})).__members__ if m.startswith("SM")]
        raise ExportError(f"compute capability {cc} is not one this TensorRT-RTX builds for (known: {', '.join(known)})")
    return getattr(trt.ComputeCapability, name)


class _Logger:
    """TensorRT logger that keeps the errors for the exception message."""

    def __new__(cls, trt):
        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors = []

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)

        return L()


def build_engine(trt, onnx_path: Path, spec: ExportSpec, target: str, compute_capabilities: tuple,
                 weight_streaming: bool = False) -> bytes:
    """Parse the ONNX file and build a serialized engine with the spec's profiles (and, with
    `weight_streaming`, TensorRT's WEIGHT_STREAMING flag)."""
    logger = _Logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # full TensorRT without a GPU
        raise ExportError(f"{spec.name}: cannot create a {target} builder here ({e})") from None
    if builder is None:
        raise ExportError(f"{spec.name}: cannot create a {target} builder here: " + "; ".join(logger.errors[-3:]))
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:  # full TensorRT: keep the graph's dtypes as TensorRT-RTX always does
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{spec.name}: TensorRT could not parse {onnx_path.name}: " + "; ".join(errs[:3]))
    config = builder.create_builder_config()
    if target == "tensorrt-rtx":
        caps = [_parse_cc(c, trt) for c in compute_capabilities]
        config.num_compute_capabilities = len(caps)
        for i, c in enumerate(caps):
            config.set_compute_capability(c, i)
    for prof in spec.profiles:
        p = builder.create_optimization_profile()
        for t in spec.inputs:
            if any(isinstance(d, str) for d in t.shape):
                p.set_shape(t.name, *(t.concrete(prof.dims(w)) for w in ("min", "opt", "max")))
        config.add_optimization_profile(p)
    if weight_streaming:
        flag = getattr(trt.BuilderFlag, "WEIGHT_STREAMING", None)
        if flag is not None:
            config.set_flag(flag)
        if flag is None or not config.get_flag(flag):
            raise ExportError(f"{spec.name}: {trt.__name__} {trt.__version__} cannot build with weight streaming "
                              "(TensorRT 10 or TensorRT-RTX); export with --no-weight-streaming")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{spec.name}: engine build failed: " + "; ".join(logger.errors[-3:] or ["(no message)"]))
    return plan


# ---------------------------------------------------------------------------------------------
# the export command


def check_request(target: str, precision: str):
    """Reject what cannot be built before any weights are read; returns the TensorRT module."""
    if target == "aoti":  # AOTInductor: its own precision rules, no TensorRT module
        from .aoti_build import check_aoti_request

        return check_aoti_request(precision)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    return trt_module(target)


@dataclass
class Target:
    """An export target as `export_engines` drives it: the artifact's file suffix; what an artifact is
    tied to besides its spec, precision and sources (versions, GPUs: a change makes it stale); the
    manifest fields of the directory and of every network; and `build(spec, load, work, say)`, which
    gets the network from `load()`, writes one artifact into the private folder `work` and returns
    (its path, {manifest fields: export_seconds, build_seconds, ...})."""

    name: str
    suffix: str
    tied_to: dict
    header: dict
    entry: dict
    build: Callable
    rebuild_args: str = ""  # options the rebuild command needs beyond the common ones
    spec_tied_to: Callable | None = None  # spec -> what else one spec's artifact is tied to (a build option)


def _fingerprint(spec: ExportSpec, target: str, precision: str, sources: dict, tied_to: dict) -> str:
    doc = {"spec": spec.to_json(), "target": target, "precision": precision,
           "sources": {k: v["sha256"] for k, v in sorted(sources.items())}} | tied_to
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def engine_file_name(spec_name: str) -> str:
    return f"{spec_name}.engine"


def _gpu_compute_capability() -> str | None:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return None


def _tensorrt_target(trt, target: str, caps: tuple, precision: str = "bf16", weight_streaming: bool = True) -> Target:
    """ONNX export (fp8: then calibrated FP8 Q/DQ on the flows' block Linears), then a TensorRT /
    TensorRT-RTX engine build (the flows with weight streaming unless `weight_streaming` is off)."""

    def streams(spec: ExportSpec) -> bool:
        return weight_streaming and spec.kind in STREAMED_KINDS

    def build(spec: ExportSpec, load, work: Path, say):
        fields = {}
        if precision == "fp8" and spec.kind not in fp8.FP8_KINDS:
            say(f"fp8 applies to the flow transformers; {spec.name} stays bf16")
            fields = {"precision": fp8.FP8_BASE_PRECISION,
                      "precision_note": "--precision fp8 quantizes the flow transformers only; this network is the bf16 export"}
        net = load()
        # fp8: the bf16 network's sizes, above the engine's (its block weights are 1 byte each)
        fields["weights"] = asdict(network_size(net))
        fields["weight_streaming"] = streams(spec)
        onnx_path = work / f"{spec.name}.onnx"
        say("exporting ONNX")
        info = export_onnx(spec, net, onnx_path)
        if precision == "fp8" and spec.kind in fp8.FP8_KINDS:
            fields["fp8"] = fp8.export_fp8(spec, net, onnx_path, say)
            info["bytes"] = fields["fp8"]["onnx_bytes"]
        del net  # free the network before TensorRT's builder takes its share of host memory
        gc.collect()
        say(f"ONNX {info['bytes'] / 1e6:.1f} MB in {info['seconds']:.1f} s; building {target} engine"
            + (" with weight streaming" if streams(spec) else ""))
        t0 = time.perf_counter()
        plan = build_engine(trt, onnx_path, spec, target, caps, weight_streaming=streams(spec))
        build_s = time.perf_counter() - t0
        path = work / engine_file_name(spec.name)
        path.write_bytes(memoryview(plan))
        return path, {"onnx_bytes": info["bytes"], "export_seconds": info["seconds"], "build_seconds": round(build_s, 2), **fields}

    versions = {"tensorrt_module": trt.__name__, "tensorrt_version": trt.__version__, "compute_capabilities": list(caps)}
    tied_to = {"trt": trt.__version__, "caps": list(caps) if target == "tensorrt-rtx" else "build-gpu", "exporter": EXPORTER_VERSION}
    header = dict(versions)
    if precision == "fp8":
        tied_to["fp8"] = fp8.settings_key()  # calibration settings decide the engine too
        header["precision_note"] = ("fp8: the flow transformers' block Linears in FP8 E4M3 with calibrated scales "
                                    "(per network under 'fp8'); the SS decoder and DINOv3 in bf16")
    return Target(target, ".engine", tied_to, header=header, entry=versions | {"exporter": EXPORTER_VERSION}, build=build,
                  rebuild_args="" if weight_streaming else " --no-weight-streaming",
                  spec_tied_to=lambda spec: {"weight_streaming": True} if streams(spec) else {})


def _sync_and_hash(path: Path) -> tuple[str, int]:
    """sha256 and size of a finished artifact, flushed to disk before it is renamed into place."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return sha256_file(path), path.stat().st_size


def export_engines(source: Source, target: str, out_dir, precision: str = "bf16", max_tokens: int | None = None,
                   only: list[str] | None = None, compute_capabilities: tuple | None = None, force: bool = False,
                   keep_onnx: bool = False, device: str | None = None, weight_streaming: bool = True, progress=print,
                   _fail_after_build=None) -> dict:
    """Build every engine (TensorRT targets) or package (aoti) of `source` into `out_dir`; returns the manifest.

    `device` (aoti only): what the packages are compiled for, cuda when available, else cpu.
    `weight_streaming` (TensorRT targets): build the flow transformers with weight streaming.
    `_fail_after_build(spec)` is a test hook called between building an artifact and moving it into place."""
    trt = check_request(target, precision)
    out = Path(out_dir)
    if target == "aoti":
        from .aoti_build import aoti_target

        tgt = aoti_target(device)
    else:
        default = fp8.FP8_RTX_COMPUTE_CAPABILITIES if precision == "fp8" else RTX_COMPUTE_CAPABILITIES
        caps = tuple(compute_capabilities or default)
        if target == "tensorrt":
            cc = _gpu_compute_capability()
            if cc is None:
                raise ExportError("--target tensorrt builds for the GPU it runs on, and no CUDA GPU is visible; "
                                  "use --target tensorrt-rtx to build on a machine without a GPU")
            caps = (cc,)
        if precision == "fp8":
            fp8.check_compute_capabilities(caps, target)
        tgt = _tensorrt_target(trt, target, caps, precision, weight_streaming)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out, ".build-")  # build folders of a killed export
    specs = build_specs(source.configs, source.dino_config, source.geometry, max_tokens=max_tokens, only=only)
    entries = dict(previous_manifest(out).get("networks", {}))
    rebuild = (f"pixal3d-rt export {source.cli_args} --target {target} --out {shlex.quote(str(out))} --precision {precision}"
               + (f" --max-tokens {max_tokens}" if max_tokens else "") + tgt.rebuild_args)
    manifest = {"format": MANIFEST_FORMAT, "target": target, **tgt.header, "precision": precision,
                "source": source.label, "rebuild_command": rebuild, "networks": entries}
    total = len(specs)
    for i, spec in enumerate(specs, 1):
        tag = f"[{i}/{total}] {spec.name}"
        old = entries.get(spec.name, {})
        sources = source.hashes(spec.model_key, old.get("source_files", {}))
        fp = _fingerprint(spec, target, precision, sources, tgt.tied_to | (tgt.spec_tied_to(spec) if tgt.spec_tied_to else {}))
        path = out / f"{spec.name}{tgt.suffix}"
        if (not force and old.get("fingerprint") == fp and path.is_file()
                and path.stat().st_size == old.get("bytes") and sha256_file(path) == old.get("sha256")):
            progress(f"{tag}: up to date ({path.name})")
            continue
        timing = {}

        def load(spec=spec, tag=tag):
            progress(f"{tag}: loading {spec.model_key} ({precision})")
            t0 = time.perf_counter()
            net = source.load(spec, precision)
            timing["load_seconds"] = round(time.perf_counter() - t0, 2)
            return net

        work = private_dir(out, f".build-{spec.name}-")
        try:
            built, fields = tgt.build(spec, load, work, lambda msg, tag=tag: progress(f"{tag}: {msg}"))
            if _fail_after_build is not None:
                _fail_after_build(spec)
            digest, nbytes = _sync_and_hash(built)
            os.replace(built, path)  # same file system: the artifact appears whole or not at all
            if keep_onnx:
                keep = out / "onnx"
                keep.mkdir(exist_ok=True)
                for f in work.glob("*.onnx*"):
                    os.replace(f, keep / f.name)
            entries[spec.name] = {
                "file": path.name, "sha256": digest, "bytes": nbytes, "fingerprint": fp,
                "spec": spec.to_json(), "target": target, "precision": precision, **tgt.entry,
                "source_files": sources, **timing, **fields, "torch_version": torch.__version__,
                "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            write_manifest(out, manifest)
            progress(f"{tag}: wrote {path.name} ({nbytes / 1e6:.1f} MB), build {fields['build_seconds']:.1f} s")
        finally:
            shutil.rmtree(work, ignore_errors=True)
            gc.collect()
    write_manifest(out, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# --verify: each engine once against the eager path, on this machine's GPU

VERIFY_TOLERANCE = {"bf16": 3e-2, "fp16": 3e-2, "fp32": 5e-3,  # relative L2 (DESIGN.md §7; fp32 allows TF32)
                    # fp8 vs the bf16 eager network: 0.038-0.061 measured (fake-quantized full-size flows,
                    # random weights, opt shapes, H200; tiny preset through onnxruntime 0.031-0.040)
                    "fp8": 1e-1}


def verify_engines(source: Source, out_dir, precision: str | None = None, only: list[str] | None = None,
                   progress=print, reps: int = 3) -> list[dict]:
    """Run every engine of `out_dir` at its profile's opt shape and the eager network (same weights,
    same precision) on the same inputs; report relative errors and times. Needs a CUDA GPU, except
    for AOTInductor CPU packages (run on the CPU)."""
    from pixal3d_rt.runtime.tensorrt_engine import engine_class

    from .modules import eager_outputs, example_inputs
    from .onnx_export import relative_errors

    m = read_manifest(out_dir)
    nets = {n: e for n, e in sorted(m.get("networks", {}).items()) if not only or n in only}
    if any(e.get("device") != "cpu" for e in nets.values()) and not torch.cuda.is_available():
        raise ExportError("--verify runs each engine on this machine's NVIDIA GPU and none is visible; "
                          "copy the engine directory to the GPU machine and run the same command there")
    records = []
    for name, e in nets.items():
        dev = "cpu" if e.get("device") == "cpu" else "cuda"
        eng = engine_class(e, m).load(out_dir, name, device=dev)
        spec = eng.spec
        prec = precision or e.get("precision", "bf16")
        net = source.load(spec, prec).to(dev)
        dims = spec.profiles[0].dims("opt") if spec.profiles else {}
        inputs, coords = example_inputs(spec, dims, torch.Generator().manual_seed(0))
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        coords = coords.to(dev) if coords is not None else None
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def timed(fn):
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                out = fn()
            sync()
            return out, (time.perf_counter() - t0) * 1000 / reps

        with torch.no_grad():
            ref, eager_ms = timed(lambda: eager_outputs(spec, net, inputs, coords))
            got, engine_ms = timed(lambda: eng.run(inputs))
        out = spec.outputs[0].name
        err = relative_errors(got[out].float(), ref[out].float())
        finite = bool(torch.isfinite(got[out]).all())
        tol = VERIFY_TOLERANCE[prec]
        ok = finite and err["rel_l2"] <= tol
        rec = {"network": name, "dims": dims, **err, "finite": finite, "tolerance_rel_l2": tol,
               "engine_ms": round(engine_ms, 3), "eager_ms": round(eager_ms, 3), "ok": ok}
        progress(f"verify {name} {dims or ''}: rel_l2 {err['rel_l2']:.2e} max_rel {err['max_rel']:.2e} "
                 f"engine {engine_ms:.2f} ms, eager {eager_ms:.2f} ms  {'PASS' if ok else 'FAIL'} (rel_l2 <= {tol:g})")
        records.append(rec)
        net = eng = inputs = ref = got = None  # free before the next network
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return records
