"""TensorRT / TensorRT-RTX engine runner: one `Engine` class for both (same Python API).

`TensorRTEngine.load(engine_dir, name)` checks, before touching the GPU, everything that can be
checked: the manifest (present, readable, of this format), the engine file (present, same size and
sha256 as recorded: not truncated or corrupt), the TensorRT module it was built with (installed,
same version); then the GPU (present, a compute capability the engine was built for); then it
deserializes. Every failure raises `EngineError` naming the file and the rebuild command recorded
in the manifest, never a crash inside TensorRT.

`run` binds torch tensors by name (inputs cast to the engine's dtypes and made contiguous,
outputs allocated by torch), picks the optimisation profile whose min..max holds the input
shapes, sets the shapes, and enqueues on the current CUDA stream (no synchronisation: results
are ordered on that stream like any torch op).
"""
from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path

import torch

from pixal3d_rt.errors import Pixal3DError
from pixal3d_rt.files import sha256_file  # one definition (export.trt_build imports it from here)

from .engine import Engine, stage_module
from .specs import ExportSpec

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1  # what pixal3d_rt.export.trt_build writes
TENSORRT_MODULES = ("tensorrt_rtx", "tensorrt")


class EngineError(Pixal3DError):
    """An engine cannot be used here; the message names the file and the remedy."""


def _remedy(manifest: dict, engine_dir: Path) -> str:
    """The recorded rebuild command, writing into `engine_dir` (a copied directory is rebuilt where it is)."""
    cmd = manifest.get("rebuild_command")
    try:
        words = shlex.split(cmd) if isinstance(cmd, str) else []  # shlex reads stdin when given None
        words[words.index("--out") + 1] = str(engine_dir)
        return f"rebuild with: {shlex.join(words)}"
    except (AttributeError, TypeError, ValueError, IndexError):  # none recorded, or not a command
        return f"rebuild with: pixal3d-rt export --weights DIR --target tensorrt-rtx --out {shlex.quote(str(engine_dir))}"


def read_manifest(engine_dir) -> dict:
    engine_dir = Path(engine_dir)
    p = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: engine directory not found; build one with: pixal3d-rt export --weights DIR --out {engine_dir}")
    if not p.is_file():
        raise EngineError(f"{p}: not found (not an engine directory); build one with: pixal3d-rt export --weights DIR --out {engine_dir}")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{p}: not valid JSON ({e}); rebuild the engines with pixal3d-rt export --out {engine_dir}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise EngineError(f"{p}: manifest format {m.get('format') if isinstance(m, dict) else '?'}, this pixal3d-rt reads "
                          f"format {MANIFEST_FORMAT}; {_remedy(m if isinstance(m, dict) else {}, engine_dir)}")
    bad = manifest_problem(m)
    if bad:
        raise EngineError(f"{p}: {bad}; {_remedy(m, engine_dir)}")
    return m


# what the runners read of every network entry, and the type it must have
_ENTRY_FIELDS = {"file": str, "bytes": int, "sha256": str, "spec": dict}


def manifest_problem(m: dict) -> str | None:
    """What is wrong with a manifest of the right format (edited or damaged by hand), or None."""
    nets = m.get("networks", {})
    if not isinstance(nets, dict):
        return "'networks' is not a table"
    for name, e in nets.items():
        if not isinstance(e, dict):
            return f"network '{name}' is not a table"
        for key, kind in _ENTRY_FIELDS.items():
            if not isinstance(e.get(key), kind) or isinstance(e.get(key), bool):
                return f"network '{name}' has no valid '{key}'"
        if Path(e["file"]).name != e["file"] or e["file"] in ("", ".", ".."):
            return f"network '{name}': file '{e['file']}' is not a file name in the engine directory"
    return None


_HASHED: dict = {}  # (path, size, mtime) -> sha256: the preflight and the loader hash each engine once


def _sha256_once(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def check_entry(engine_dir, name: str, suffix: str = ".engine") -> tuple[dict, dict, Path]:
    """The manifest, the network's entry and its file, checked present and intact (size and sha256
    as recorded: not truncated, corrupt or replaced). Shared by every engine class."""
    engine_dir = Path(engine_dir)
    m = read_manifest(engine_dir)
    nets = m.get("networks", {})
    if name not in nets:
        raise EngineError(f"{engine_dir / MANIFEST}: no engine '{name}' (has: {', '.join(sorted(nets)) or 'none'}); {_remedy(m, engine_dir)}")
    e = nets[name]
    path = engine_dir / e.get("file", f"{name}{suffix}")
    if not path.is_file():
        raise EngineError(f"{path}: engine file not found; {_remedy(m, engine_dir)}")
    if path.stat().st_size != e.get("bytes") or _sha256_once(path) != e.get("sha256"):
        raise EngineError(f"{path}: engine file is corrupt or was modified (size/sha256 differ from {MANIFEST}); {_remedy(m, engine_dir)}")
    return m, e, path


def engine_class(entry: dict, manifest: dict):
    """The Engine class that runs a manifest entry: AOTIEngine for `--target aoti`, else TensorRTEngine."""
    if entry.get("target", manifest.get("target")) == "aoti":
        from .aoti_engine import AOTIEngine

        return AOTIEngine
    return TensorRTEngine


def _trt_torch_dtype(trt, dt) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
    for name, td in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return td
    raise EngineError(f"engine tensor dtype {dt} has no torch equivalent")


class TensorRTEngine(Engine):
    def __init__(self, path: Path, spec, trt, engine, device: torch.device):
        self.path, self.spec, self.trt, self.engine, self.device = path, spec, trt, engine, device
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        want = {t.name for t in [*spec.inputs, *spec.outputs]}
        if names != want:
            raise EngineError(f"{path}: engine tensors {sorted(names)} do not match its manifest spec {sorted(want)}")
        self.dtypes = {n: _trt_torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self._profile = 0 if spec.profiles else None

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def check(cls, engine_dir, name: str) -> tuple[dict, dict, Path]:
        """Every check that needs no GPU. Returns (manifest, network entry, engine path)."""
        engine_dir = Path(engine_dir)
        m, e, path = check_entry(engine_dir, name)
        mod = e.get("tensorrt_module", m.get("tensorrt_module"))
        ver = e.get("tensorrt_version", m.get("tensorrt_version"))
        if mod not in TENSORRT_MODULES:  # the manifest names what is imported: never an arbitrary module
            raise EngineError(f"{path}: built with '{mod}', not a TensorRT module ({' or '.join(TENSORRT_MODULES)}); "
                              f"{_remedy(m, engine_dir)}")
        try:
            trt = importlib.import_module(mod)
        except (ImportError, TypeError):
            pip = "tensorrt-rtx" if mod == "tensorrt_rtx" else "tensorrt"
            raise EngineError(f"{path}: built with {mod} {ver}, which is not installed: pip install {pip}=={ver}, "
                              f"or {_remedy(m, engine_dir)}") from None
        if trt.__version__ != ver:
            raise EngineError(f"{path}: built with {mod} {ver}, installed is {trt.__version__} (engines are tied to "
                              f"the TensorRT version); {_remedy(m, engine_dir)} (or pip install {mod.replace('_', '-')}=={ver})")
        return m, e, path

    @classmethod
    def load(cls, engine_dir, name: str, device=None) -> "TensorRTEngine":
        m, e, path = cls.check(engine_dir, name)
        engine_dir = Path(engine_dir)
        trt = importlib.import_module(e.get("tensorrt_module", m.get("tensorrt_module")))
        if not torch.cuda.is_available():
            raise EngineError(f"{path}: TensorRT engines run on an NVIDIA GPU and no CUDA device is visible; "
                              "run without --engines (eager/cuda backends)")
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise EngineError(f"{path}: TensorRT engines run on an NVIDIA GPU, asked for {device}; "
                              "run with --device cuda or without --engines")
        major, minor = torch.cuda.get_device_capability(device)
        cc = f"{major}.{minor}"
        caps = e.get("compute_capabilities", [])
        if caps and cc not in caps:
            gpu = torch.cuda.get_device_name(device)
            why = (" (TensorRT-RTX does not run on Hopper/datacenter 9.x GPUs: build with --target tensorrt there)"
                   if e.get("target") == "tensorrt-rtx" and major == 9 else "")
            raise EngineError(f"{path}: built for compute capability {', '.join(caps)}, this GPU ({gpu}) is {cc}{why}; "
                              f"{_remedy(m, engine_dir)}")
        logger = trt.Logger(trt.Logger.ERROR)
        runtime = trt.Runtime(logger)
        data = path.read_bytes()
        if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX and TensorRT >= 10.x: diagnose before deserializing
            try:
                validity, diag = runtime.get_engine_validity(data[: runtime.engine_header_size])
                if validity == trt.EngineValidity.INVALID:
                    raise EngineError(f"{path}: TensorRT reports the engine invalid on this system (diagnostics flags {diag}: "
                                      f"version, platform, compute capability or driver); {_remedy(m, engine_dir)}")
            except (AttributeError, TypeError):
                pass
        with torch.cuda.device(device):
            engine = runtime.deserialize_cuda_engine(data)
            del data
            if engine is None:
                raise EngineError(f"{path}: TensorRT could not deserialize the engine (wrong version, GPU or driver?); "
                                  f"{_remedy(m, engine_dir)}")
            eng = cls(path, ExportSpec.from_json(e["spec"]), trt, engine, device)
            eng.runtime = runtime  # TensorRT requires the runtime to outlive its engines
            return eng

    # -- running -----------------------------------------------------------------------------

    def run(self, inputs: dict) -> dict:
        dims = self._dims(inputs)
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0  # 0: tests' CPU stand-in
        if self.spec.profiles:
            prof = self.spec.profile_for(dims)
            if prof != self._profile:
                self.context.set_optimization_profile_async(prof, stream)
                self._profile = prof
        bound = []  # keep the cast inputs alive until enqueued (the allocator orders reuse on this stream)
        for t in self.spec.inputs:
            x = inputs[t.name].to(device=self.device, dtype=self.dtypes[t.name]).contiguous()
            bound.append(x)
            self.context.set_input_shape(t.name, tuple(x.shape))
            self.context.set_tensor_address(t.name, x.data_ptr())
        outs = {}
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            y = torch.empty(shape, dtype=self.dtypes[t.name], device=self.device)
            self.context.set_tensor_address(t.name, y.data_ptr())
            outs[t.name] = y
        if not self.context.execute_async_v3(stream):
            raise EngineError(f"{self.path}: TensorRT failed to run {self.spec.name} at {dims}")
        return {k: v.float() for k, v in outs.items()}


def check_engines(engine_dir) -> dict:
    """Every check of every network of the directory that needs no device (manifest, files intact,
    the versions they were built with), by the runner of each; returns the manifest."""
    m = read_manifest(engine_dir)
    for name, e in sorted(m.get("networks", {}).items()):
        engine_class(e, m).check(engine_dir, name)
    return m


def load_engine_dir(engine_dir, device=None, keys=None) -> dict:
    """{pipeline key: drop-in module} for the engines of the directory (see runtime.engine), only
    those of networks in `keys` when given (DINOv3 engines are keyed by their spec name). Each is
    loaded by the runner of its target (`engine_class`: TensorRT engine or AOTInductor package)."""
    m = read_manifest(engine_dir)
    modules = {}
    for name, e in sorted(m.get("networks", {}).items()):
        key = e.get("spec", {}).get("model_key", name)
        if keys is not None and key not in keys and name not in keys:
            continue
        eng = engine_class(e, m).load(engine_dir, name, device=device)
        key = eng.spec.model_key if eng.spec.kind != "dinov3" else name
        modules[key] = stage_module(eng)
    return modules


def use_engines(pipe, engine_dir, progress=None) -> list[str]:
    """Replace the pipeline's networks by the engines of `engine_dir` where it holds one (the
    rest keep their backend). Each engine must have been exported from a network of the same
    shape as the one it replaces. Returns the replaced pipeline keys."""
    manifest = read_manifest(engine_dir)
    dino_sizes = {}  # DINOv3 engines: one per image size the pipeline encodes at
    for name, e in sorted(manifest.get("networks", {}).items()):
        spec = e.get("spec", {})
        if spec.get("kind") == "dinov3":
            dino_sizes[name] = int(spec.get("meta", {}).get("image_size", -1))
        elif spec.get("model_key") not in pipe.models and progress:
            progress(f"[engines] {name}: not used by this pipeline")
    wanted = {n for n, size in dino_sizes.items() if size in (pipe.geometry.lr_image, pipe.geometry.hr_image)}
    modules = load_engine_dir(engine_dir, device=pipe.device, keys=set(pipe.models) | wanted)
    replaced = []
    for name in wanted & set(modules):
        pipe.conditioner.token_encoders[dino_sizes[name]] = modules.pop(name)
        replaced.append(name)
        if progress:
            progress(f"[engines] DINOv3 @{dino_sizes[name]}px: {name}")
    for key, mod in modules.items():
        old = pipe.models[key]
        for attr in ("resolution", "in_channels", "out_channels"):
            if hasattr(mod, attr) and hasattr(old, attr) and getattr(mod, attr) != getattr(old, attr):
                raise EngineError(f"{Path(engine_dir) / MANIFEST}: engine for {key} has {attr} {getattr(mod, attr)}, "
                                  f"the loaded network {getattr(old, attr)} (engines of other weights?); "
                                  f"{_remedy(manifest, Path(engine_dir))}")
        pipe.models[key] = mod
        if key in getattr(pipe, "flows", {}):  # the sampler calls the flows through pipe.flows
            pipe.flows[key] = mod
        replaced.append(key)
        if progress:
            progress(f"[engines] {key}: {mod.engine.path.name}")
    return replaced
