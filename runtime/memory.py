"""Memory probes: the peak bytes a stage allocates above what was live when it started.

On CUDA this is torch's allocator peak (`max_memory_allocated`, reset per stage). On the CPU no
allocator keeps a peak, so `LiveBytes` counts it at the operator level: every tensor storage an op
creates is added when it appears and taken off when Python frees it (weakref finalizers), which is
exact for what torch code allocates (kernel-internal scratch is not seen).
"""
from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Inside `with LiveBytes() as lb:` `lb.live` / `lb.peak` are the bytes of storages created inside
    the block that are still alive / were alive at once at most. `reset_peak()` starts a new peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = id(st)  # torch keeps one Python object per live storage, so its id is stable
        if key in self._sizes:
            return
        n = st.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._untrack, key)

    def _untrack(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class StagePeak:
    """Per stage: bytes allocated at the peak above the bytes live at the stage's start.
    `begin()` before a stage, `end()` after it returns that stage's peak (bytes)."""

    def __init__(self, device, cpu_tracker: LiveBytes | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.tracker = cpu_tracker
        self._start = 0

    @property
    def available(self) -> bool:
        return self.cuda or self.tracker is not None

    def live(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return self.tracker.live if self.tracker is not None else 0

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.tracker is not None:
            self.tracker.reset_peak()
        self._start = self.live()

    def end(self) -> int | None:
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        if self.tracker is not None:
            return max(0, self.tracker.peak - self._start)
        return None


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, as stored."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class NvmlProbe:
    """Device memory of this process as NVML reports it (or None without NVML / a GPU). Where the
    process list is hidden (containers), the device's used memory less what was used before this
    process created its CUDA context stands in (`idle_device_used`)."""

    def __init__(self, device_index: int | None = 0):
        self.handle = None
        self.source = "unavailable" if device_index is not None else "not a GPU run"
        if device_index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
            self.pid = os.getpid()
            self.idle_used = idle_device_used(device_index)
            if self._process_bytes() is not None:
                self.source = "nvml process"
            else:
                self.source = "nvml device used" + (" above idle" if self.idle_used else "")
        except Exception:  # no NVML library, no GPU: the peak is reported as unavailable
            self.handle = None

    def _process_bytes(self):
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == self.pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None

    def read(self):
        if self.handle is None:
            return None
        if self.source == "nvml process":
            value = self._process_bytes()
            if value is not None:
                return value
        # containers can hide the process list: the device's used memory above idle stands in (sole user)
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used) - self.idle_used


_IDLE_USED: dict = {}


def idle_device_used(index: int) -> int:
    """Device memory used before this process created its CUDA context (driver reservations, other
    processes): read once, on the first call before any CUDA call; 0 if CUDA was already up or NVML is
    missing. Call it early (the bench worker and the pipeline's constructors do)."""
    if index not in _IDLE_USED:
        used = 0
        if not torch.cuda.is_initialized():
            try:
                import pynvml

                pynvml.nvmlInit()
                used = int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
            except Exception:  # no NVML library or no GPU: nothing to subtract
                used = 0
        _IDLE_USED[index] = used
    return _IDLE_USED[index]


def nvml_index(device) -> int:
    """NVML's index of a torch CUDA device, found without creating a CUDA context (torch counts the
    devices CUDA_VISIBLE_DEVICES leaves visible; NVML counts all of them)."""
    index = torch.device(device).index or 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def device_memory_breakdown(device=None, top: int = 12) -> dict:
    """What torch's CUDA allocator holds now, per memory pool (0 = the default pool; others: CUDA
    graph pools) in reserved and allocated bytes, and its largest allocated blocks with where they
    were allocated (frames only while `torch.cuda.memory._record_memory_history` records)."""
    pools: dict[str, dict] = {}
    blocks = []
    for seg in torch.cuda.memory_snapshot():
        if device is not None and seg.get("device") != torch.device(device).index:
            continue
        pool = str(tuple(seg.get("segment_pool_id", (0, 0))))
        entry = pools.setdefault(pool, {"pool": pool, "reserved_bytes": 0, "allocated_bytes": 0, "segments": 0})
        entry["reserved_bytes"] += seg["total_size"]
        entry["allocated_bytes"] += seg["allocated_size"]
        entry["segments"] += 1
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                frames = [f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in b.get("frames", [])
                          if "pixal3d" in f["filename"] or "/runtime/" in f["filename"] or "/kernels/" in f["filename"]]
                blocks.append({"bytes": b["size"], "pool": pool, "frames": frames[:6]})
    blocks.sort(key=lambda b: -b["bytes"])
    return {"pools": sorted(pools.values(), key=lambda p: -p["reserved_bytes"]), "largest_blocks": blocks[:top]}
