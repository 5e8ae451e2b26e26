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

Device memory, per stage of a plan (`Engine.placed`): the weights, the execution context and the
context's working memory are taken when the network's stage starts; a `stage`/`streamed` network
gives all of them back when it ends, a `resident` one only the working memory. The working memory
is a torch tensor sized for the current input shapes (the context is created with user-managed
memory), so it comes from and returns to torch's allocator and shows in its peaks. Weights: where
the runtime defers them (TensorRT-RTX) the engine is deserialized without its device weights,
which are loaded from the memory-mapped engine file per stage and unloaded after; elsewhere
(TensorRT) the engine itself is released and deserialized again from that file. An engine built
with weight streaming, placed `streamed`, keeps only the bytes the plan gives its weights on the
device (`set_streaming_budget`); TensorRT streams the rest from host memory as layers run. Outside
any plan an engine takes everything at its first `run` and keeps it.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import mmap
import shlex
from pathlib import Path

import torch

from pixal3d_rt.errors import Pixal3DError
from pixal3d_rt.files import sha256_file  # one definition (export.trt_build imports it from here)

from .engine import Engine, stage_module
from .planner import NetworkSize
from .specs import ExportSpec
from .stages import STAGES

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
# what an entry may record of the network's sizes as exported (planner.NetworkSize)
_WEIGHTS_FIELDS = ("bytes", "unit_bytes", "rest_bytes", "units")


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
        if "weight_streaming" in e and not isinstance(e["weight_streaming"], bool):
            return f"network '{name}' has no valid 'weight_streaming'"
        w = e.get("weights")
        if w is not None and not (isinstance(w, dict) and set(w) == set(_WEIGHTS_FIELDS)
                                  and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in w.values())):
            return f"network '{name}' has no valid 'weights' (integers {', '.join(_WEIGHTS_FIELDS)})"
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
    def __init__(self, path: Path, spec, trt, engine, device: torch.device, *, runtime=None, blob=None,
                 deferred: bool = False, entry: dict | None = None):
        self.path, self.spec, self.trt, self.engine, self.device = path, spec, trt, engine, device
        self.runtime = runtime  # TensorRT requires the runtime to outlive its engines
        self.blob = blob  # the serialized engine (the mapped file): deferred weights load from it, a released engine deserializes from it
        self.deferred = deferred  # deserialized without device weights: load_weights / unload_weights per stage
        entry = entry or {}
        self.streaming = bool(entry.get("weight_streaming", False))
        self.weights = NetworkSize(**entry["weights"]) if isinstance(entry.get("weights"), dict) else None
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        want = {t.name for t in [*spec.inputs, *spec.outputs]}
        if names != want:
            raise EngineError(f"{path}: engine tensors {sorted(names)} do not match its manifest spec {sorted(want)}")
        self.dtypes = {n: _trt_torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.context = None  # created when a stage (or the first run) needs it
        self._context_config = None  # the runtime config the context was created with (kept alive with it)
        self._runtime_cache = None  # TensorRT-RTX: kernels compiled for one context, reused by the next
        self.activations = None  # the context's working memory (uint8 torch tensor), for the current stage
        self.streaming_budget = None  # what TensorRT was last told to keep of the streamable weights (bytes)
        self._profile = None

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
        blob = map_file(path)
        if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX and TensorRT >= 10.x: diagnose before deserializing
            try:
                validity, diag = runtime.get_engine_validity(blob[: runtime.engine_header_size])
                if validity == trt.EngineValidity.INVALID:
                    raise EngineError(f"{path}: TensorRT reports the engine invalid on this system (diagnostics flags {diag}: "
                                      f"version, platform, compute capability or driver); {_remedy(m, engine_dir)}")
            except (AttributeError, TypeError):
                pass
        deferred = hasattr(runtime, "defer_weights_loading")  # TensorRT-RTX: device weights only while a stage runs
        with torch.cuda.device(device):
            if deferred:
                runtime.defer_weights_loading = True
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise EngineError(f"{path}: TensorRT could not deserialize the engine (wrong version, GPU or driver?); "
                                  f"{_remedy(m, engine_dir)}")
            return cls(path, ExportSpec.from_json(e["spec"]), trt, engine, device, runtime=runtime, blob=blob,
                       deferred=deferred, entry=e)

    # -- device memory per stage ---------------------------------------------------------------

    def enter_stage(self, weight_bytes: int | None = None) -> None:
        """The engine's weights on the device (`weight_bytes` of them when it streams; None: all)
        and an execution context. What is already there stays."""
        if self.engine is None:  # released at the end of an earlier stage (no deferred weights here)
            self.engine = self._deserialize()
        self.set_streaming_budget(weight_bytes)  # before the context: TensorRT fixes it while one exists
        if self.deferred and not self.engine.weights_loaded:
            with self._on_device():
                if not self.engine.load_weights(self.blob):
                    raise EngineError(f"{self.path}: TensorRT could not load the engine's weights onto the GPU "
                                      "(out of GPU memory?)")
        if self.context is None:
            self.context = self._new_context()

    def leave_stage(self, keep: bool) -> None:
        """Free the context's working memory; unless `keep`, the context and the device weights too."""
        self.activations = None  # torch's allocator reuses it only after the work queued on this stream
        if keep:
            return
        self._idle()  # TensorRT frees contexts and weights only with no inference in flight
        self.context = self._context_config = None
        if self.engine is None:
            return
        if self.deferred:
            if self.engine.weights_loaded:
                self.engine.unload_weights()
        else:
            self.engine = None  # its device weights go with it; the next stage deserializes it again

    def set_streaming_budget(self, weight_bytes: int | None) -> int | None:
        """Keep `weight_bytes` of the engine's weights on the device (None: all of them); TensorRT
        streams the rest from host memory layer by layer. Returns TensorRT's budget (the streamable
        bytes it keeps on the device), or None for an engine built without weight streaming, which
        keeps every weight on the device. Changing the budget recreates the execution context."""
        streamable = int(getattr(self.engine, "streamable_weights_size", 0) or 0)
        if streamable <= 0:
            return None
        budget = streamable if weight_bytes is None else self._streamable_share(int(weight_bytes), streamable)
        if budget == self.streaming_budget:
            return budget
        if self.context is not None:
            self._idle()
            self.context = self._context_config = None
            self.activations = None
        self.engine.weight_streaming_budget_v2 = budget
        if int(self.engine.weight_streaming_budget_v2) != budget:
            raise EngineError(f"{self.path}: TensorRT did not accept a weight streaming budget of {budget} bytes "
                              f"(streamable: {streamable} bytes)")
        self.streaming_budget = budget
        return budget

    def _streamable_share(self, weight_bytes: int, streamable: int) -> int:
        """Of `weight_bytes` for all the weights, what is left for the streamable ones once the
        weights TensorRT never streams are counted (they stay on the device in any case)."""
        total = None
        stat = getattr(getattr(self.trt, "EngineStat", None), "TOTAL_WEIGHTS_SIZE", None)
        if stat is not None and hasattr(self.engine, "get_engine_stat"):
            total = int(self.engine.get_engine_stat(stat))
        if (total is None or total < 0) and self.weights is not None:
            total = self.weights.bytes  # the network as exported, when the runtime does not report it
        fixed = max(0, (total or streamable) - streamable)
        return min(streamable, max(0, weight_bytes - fixed))

    def _deserialize(self):
        with self._on_device():
            engine = self.runtime.deserialize_cuda_engine(self.blob)
        if engine is None:
            raise EngineError(f"{self.path}: TensorRT could not deserialize the engine again (out of GPU memory?)")
        self.streaming_budget = None  # a new engine starts from TensorRT's default
        return engine

    def _new_context(self):
        """An execution context whose working memory this runner provides (`activations`)."""
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        with self._on_device():
            if hasattr(self.engine, "create_runtime_config"):
                config = self.engine.create_runtime_config()
                config.set_execution_context_allocation_strategy(strategy)
                if hasattr(config, "create_runtime_cache"):
                    if self._runtime_cache is None:
                        self._runtime_cache = config.create_runtime_cache()
                    config.set_runtime_cache(self._runtime_cache)
                context = self.engine.create_execution_context(config)
                self._context_config = config
            else:
                context = self.engine.create_execution_context(strategy)
        if context is None:
            raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        self._profile = 0 if self.spec.profiles else None
        return context

    def _bind_activations(self) -> None:
        """Give the context working memory for the shapes just set (kept, and grown when needed,
        until the stage ends)."""
        if hasattr(self.context, "update_device_memory_size_for_shapes"):
            need = int(self.context.update_device_memory_size_for_shapes())
        else:
            need = int(self.engine.get_device_memory_size_for_profile_v2(self._profile or 0))
        if self.activations is None or self.activations.numel() < need:
            self.activations = None  # the smaller buffer back to the allocator before the larger one is taken
            self.activations = torch.empty(max(need, 1), dtype=torch.uint8, device=self.device)
        self.context.set_device_memory(self.activations.data_ptr(), self.activations.numel())

    def _idle(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()  # CPU: tests' stand-in

    # -- running -----------------------------------------------------------------------------

    def run(self, inputs: dict) -> dict:
        dims = self._dims(inputs)
        if self.context is None:  # outside a stage plan: everything taken now and kept
            self.enter_stage()
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
        self._bind_activations()
        outs = {}
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            y = torch.empty(shape, dtype=self.dtypes[t.name], device=self.device)
            self.context.set_tensor_address(t.name, y.data_ptr())
            outs[t.name] = y
        if not self.context.execute_async_v3(stream):
            raise EngineError(f"{self.path}: TensorRT failed to run {self.spec.name} at {dims}")
        return {k: v.float() for k, v in outs.items()}


def map_file(path: Path):
    """The file memory-mapped read-only: its pages are the OS's file cache, read again from disk
    when evicted, instead of a private copy held for the engine's life."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


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
    shape as the one it replaces. Every engine is listed in `pipe.stage_engines` under
    (stage, network) for each stage that runs it, where the pipeline places it per its stage
    plan; under a device budget (`pipe.vram_budget`) each starts with nothing on the device.
    Returns the replaced pipeline keys."""
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
    on_stage = pipe.stage_engines
    image_sizes = {"image_lr": pipe.geometry.lr_image, "image_hr": pipe.geometry.hr_image}
    for st in STAGES:
        for net in st.networks:
            if net == "dinov3":
                mod = pipe.conditioner.token_encoders.get(image_sizes.get(st.inputs[0]))
            else:
                mod = pipe.models.get(net)
            if isinstance(getattr(mod, "engine", None), Engine):
                on_stage[(st.name, net)] = mod.engine
    if getattr(pipe, "vram_budget", None) is not None:  # the plan brings each onto the device in its stages
        for engine in set(on_stage.values()):
            engine.leave_stage(keep=False)
    return replaced
