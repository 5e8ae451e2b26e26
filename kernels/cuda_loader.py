"""Run-time loader of the CUDA kernels in kernels/cuda/ through CuPy (DESIGN.md §6).

`pip install` compiles nothing. At first use, per device, the module is taken from the first of:
1. a fatbin built by CMakeLists.txt (`cmake -S . -B build && cmake --build build`), found at
   $PIXAL3D_CUDA_FATBIN, kernels/cuda/pixal3d_kernels.fatbin (package data) or build/pixal3d_kernels.fatbin,
   and used only if it holds code for this GPU and was built from the sources beside it (it carries
   a hash of them);
2. the source compiled by NVRTC through `cupy.RawModule` (CuPy caches the result on disk).

Kernels take raw torch data pointers and run on torch's current stream, so no CuPy arrays or
CuPy memory pools are involved.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
MODULE_SOURCE = CUDA_DIR / "pixal3d_kernels.cu"
FATBIN_NAME = "pixal3d_kernels.fatbin"
HASH_SYMBOL = "pixal3d_kernels_src_hash"
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)


class CudaKernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot be used here (no CuPy, no CUDA device, compilation failed)."""


def source_files() -> list[Path]:
    """kernels/cuda/*.cu and *.cuh in file-name order (the order CMakeLists.txt hashes them in)."""
    return sorted([*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh")], key=lambda p: p.name)


def source_hash() -> str:
    """First 16 hex digits of sha256 over the sources' contents, concatenated in file-name order."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def expanded_source() -> str:
    """The module source with every `#include "x.cuh"` of kernels/cuda/ inlined (NVRTC gets one string,
    so CuPy's on-disk cache key covers the headers too)."""

    def inline(match: re.Match) -> str:
        path = CUDA_DIR / match.group(1)
        if not path.exists():
            raise CudaKernelsUnavailable(f"{MODULE_SOURCE.name} includes {match.group(1)}, which is not in {CUDA_DIR}")
        return path.read_text()

    return _INCLUDE.sub(inline, MODULE_SOURCE.read_text())


def fatbin_candidates() -> list[Path]:
    paths = []
    if os.environ.get("PIXAL3D_CUDA_FATBIN"):
        paths.append(Path(os.environ["PIXAL3D_CUDA_FATBIN"]))
    paths += [CUDA_DIR / FATBIN_NAME, CUDA_DIR.parents[1] / "build" / FATBIN_NAME]
    return paths


def _import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise CudaKernelsUnavailable(
            "the CUDA kernels need CuPy: pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x (CUDA 13)"
        ) from e
    return cupy


class CudaModule:
    """The loaded kernels of one device: `origin` says where they came from ('fatbin:<path>' or 'nvrtc')."""

    def __init__(self, raw_module, origin: str, device_index: int):
        self.raw_module = raw_module
        self.origin = origin
        self.device_index = device_index
        self._functions: dict[str, object] = {}

    def function(self, name: str):
        if name not in self._functions:
            try:
                self._functions[name] = self.raw_module.get_function(name)
            except Exception as e:  # noqa: BLE001 - CuPy raises driver errors of several types
                raise CudaKernelsUnavailable(f"kernel {name!r} not found in the CUDA module ({self.origin}): {e}") from e
        return self._functions[name]

    def launch(self, name: str, n_threads: int, args: tuple, block: int = 256) -> None:
        """Launch kernel `name` over n_threads threads (1-D) on torch's current stream of this device."""
        import torch

        cupy = _import_cupy()
        if n_threads <= 0:
            return
        grid = (n_threads + block - 1) // block
        stream = torch.cuda.current_stream(self.device_index).cuda_stream
        with cupy.cuda.Device(self.device_index), warnings.catch_warnings():
            # CuPy 14 deprecates ExternalStream in favour of Stream.from_external (absent before 14)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.function(name)((grid,), (block,), args, stream=cupy.cuda.ExternalStream(stream))


def _read_hash(cupy, module) -> int:
    ptr = module.get_global(HASH_SYMBOL)
    return int(cupy.ndarray((), dtype=cupy.uint64, memptr=ptr).get())


def _load(device_index: int) -> CudaModule:
    cupy = _import_cupy()
    try:
        n_dev = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        raise CudaKernelsUnavailable(f"CuPy sees no CUDA device: {e}") from e
    if device_index >= n_dev:
        raise CudaKernelsUnavailable(f"CUDA device {device_index} does not exist (CuPy sees {n_dev})")
    want = int(source_hash(), 16)
    rejected = []
    with cupy.cuda.Device(device_index):
        for path in fatbin_candidates():
            if not path.is_file():
                continue
            try:
                module = cupy.RawModule(path=str(path))
                got = _read_hash(cupy, module)
            except Exception as e:  # noqa: BLE001 - no code for this GPU, unreadable file, ...
                rejected.append(f"{path}: {e}")
                continue
            if got != want:
                rejected.append(f"{path}: built from other sources (hash {got:016x}, sources {want:016x})")
                continue
            return CudaModule(module, f"fatbin:{path}", device_index)
        try:
            module = cupy.RawModule(
                code=expanded_source(),
                options=("-std=c++17", f"-DPIXAL3D_SRC_HASH=0x{want:016x}ULL"),
                backend="nvrtc",
            )
            module.compile()
        except CudaKernelsUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - NVRTC compile errors carry the log
            skipped = "".join(f"\n  skipped {r}" for r in rejected)
            raise CudaKernelsUnavailable(f"NVRTC could not compile {MODULE_SOURCE}: {e}{skipped}") from e
    origin = "nvrtc" + (f" (fatbin skipped: {'; '.join(rejected)})" if rejected else "")
    return CudaModule(module, origin, device_index)


_modules: dict[int, CudaModule] = {}
_lock = threading.Lock()


def load_module(device_index: int = 0) -> CudaModule:
    """The kernels of CUDA device `device_index`, loaded once per process (raises CudaKernelsUnavailable)."""
    with _lock:
        if device_index not in _modules:
            _modules[device_index] = _load(device_index)
        return _modules[device_index]


def cupy_available() -> bool:
    try:
        _import_cupy()
    except CudaKernelsUnavailable:
        return False
    return True
