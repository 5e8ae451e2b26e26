"""AOTInductor package runner (`pixal3d-rt export --target aoti`): one `.pt2` per stage network.

`AOTIEngine.load(engine_dir, name)` checks, before loading the package, what can be checked: the
manifest and the file (present, same size and sha256 as recorded), the torch version (a package's
shared library links against the libtorch it was built with, so it must match exactly), and the
device: a cuda package needs a GPU of the compute capability it was compiled for, a cpu package a
CPU with the instruction-set extensions of the build machine (inductor compiles with -march=native). Every failure raises `EngineError` naming
the file and the rebuild command recorded in the manifest.

`run` binds inputs by the spec's names in spec order (cast to the spec's dtypes, on the package's
device, contiguous) and returns the outputs by the spec's output names, fp32. On CUDA the package
runs on the current stream like any torch op.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .engine import Engine
from .specs import ExportSpec
from .tensorrt_engine import EngineError, _remedy, check_entry

# instruction-set flags of /proc/cpuinfo that compiled code can depend on (x86); on ARM every "Features" flag is one
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "popcnt", "abm", "movbe", "aes", "pclmul", "sha",
                 "adx", "gfni", "vaes", "vpclmul")


def cpu_isa() -> dict:
    """What a CPU package is compiled against: inductor builds with -march=native, so the code may use
    any instruction-set extension of the build machine's CPU. {"cpu_capability": ATen's level (AVX512,
    AVX2, ...), "cpu_features": the ISA flags of /proc/cpuinfo, [] where there is none}."""
    feats = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "flags":
                feats = [f for f in val.split() if f.startswith(_ISA_PREFIXES)]
                break
            if key.strip() == "Features":
                feats = val.split()
                break
    except OSError:
        pass
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_features": sorted(set(feats))}


def first_line(e: Exception, limit: int = 300) -> str:
    """`Type: first non-empty line` of an exception (torch's export/compile errors run to pages)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


def _cpu_missing(entry: dict) -> list[str]:
    """Instruction-set extensions the package was compiled with that this CPU lacks."""
    here = cpu_isa()
    built = entry.get("cpu_features") or []
    if built and here["cpu_features"]:
        return sorted(set(built) - set(here["cpu_features"]))
    cap = entry.get("cpu_capability")  # no flags to compare: at least the vector level must match
    return [cap] if cap and cap != here["cpu_capability"] else []


def _remedy_on(manifest: dict, engine_dir: Path, kind: str) -> str:
    """The rebuild command for packages of another device kind."""
    r = _remedy(manifest, engine_dir)
    return r.replace("--device cpu", f"--device {kind}").replace("--device cuda", f"--device {kind}")


class AOTIEngine(Engine):
    def __init__(self, path: Path, spec, runner, device: torch.device):
        self.path, self.spec, self.runner, self.device = path, spec, runner, device

    # -- device memory per stage: the package's weights load with it, and leave with it ----------

    def enter_stage(self, weight_bytes: int | None = None) -> None:
        if self.runner is None:  # released at the end of an earlier stage
            self.runner = _load_package(self.path, self.device)

    def leave_stage(self, keep: bool) -> None:
        if not keep and self.runner is not None:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # its kernels may still read the weights
            self.runner = None

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def check(cls, engine_dir, name: str) -> tuple[dict, dict, Path]:
        """Every check that needs no device. Returns (manifest, network entry, package path)."""
        engine_dir = Path(engine_dir)
        m, e, path = check_entry(engine_dir, name, ".pt2")
        if e.get("target", m.get("target")) != "aoti":
            raise EngineError(f"{path}: not an AOTInductor package (target {e.get('target')}); {_remedy(m, engine_dir)}")
        ver = e.get("torch_version")
        if ver != torch.__version__:
            raise EngineError(f"{path}: built with torch {ver}, installed is {torch.__version__} (AOTInductor packages are "
                              f"tied to the torch version); {_remedy(m, engine_dir)} (or pip install torch=={ver})")
        return m, e, path

    @classmethod
    def load(cls, engine_dir, name: str, device=None) -> "AOTIEngine":
        engine_dir = Path(engine_dir)
        m, e, path = cls.check(engine_dir, name)
        built = e.get("device")
        want = torch.device(device) if device is not None else torch.device(built or "cpu")
        if want.type != built:
            raise EngineError(f"{path}: compiled for {built}, asked to run on {want.type} (a package holds machine code for "
                              f"one device kind); {_remedy_on(m, engine_dir, want.type)} on a {want.type} machine")
        if built == "cuda":
            if not torch.cuda.is_available():
                raise EngineError(f"{path}: compiled for an NVIDIA GPU and no CUDA device is visible; "
                                  f"{_remedy_on(m, engine_dir, 'cpu')} for CPU packages")
            index = want.index if want.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            cc = f"{major}.{minor}"
            caps = e.get("compute_capabilities", [])
            if caps and cc not in caps:
                raise EngineError(f"{path}: compiled for compute capability {', '.join(caps)} ({e.get('gpu', '?')}), this GPU "
                                  f"({torch.cuda.get_device_name(index)}) is {cc}; {_remedy(m, engine_dir)} on this GPU")
            want = torch.device("cuda", index)
        else:
            missing = _cpu_missing(e)
            if missing:
                raise EngineError(f"{path}: compiled on a CPU with instructions this one lacks ({', '.join(missing[:6])}"
                                  f"{', ...' if len(missing) > 6 else ''}); {_remedy(m, engine_dir)} on this machine")
        try:
            runner = _load_package(path, want)
        except Exception as ex:  # a damaged zip or library that still matches the manifest's hash
            raise EngineError(f"{path}: torch could not load the AOTInductor package ({first_line(ex, 200)}); "
                              f"{_remedy(m, engine_dir)}") from None
        return cls(path, ExportSpec.from_json(e["spec"]), runner, want)

    # -- running -----------------------------------------------------------------------------

    def run(self, inputs: dict) -> dict:
        dims = self._dims(inputs)
        if self.spec.profiles:
            self.spec.profile_for(dims)  # the compiled graph holds only inside the exported range: say so, not crash
        if self.runner is None:  # outside a stage plan: loaded now and kept
            self.enter_stage()
        args = [inputs[t.name].to(device=self.device, dtype=t.torch_dtype).contiguous() for t in self.spec.inputs]
        out = self.runner(*args)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if len(outs) != len(self.spec.outputs):
            raise EngineError(f"{self.path}: the package returned {len(outs)} outputs, its spec names {len(self.spec.outputs)}")
        return {t.name: o.float() for t, o in zip(self.spec.outputs, outs)}


def _load_package(path: Path, device: torch.device):
    return torch._inductor.aoti_load_package(str(path), device_index=device.index if device.type == "cuda" else -1)
