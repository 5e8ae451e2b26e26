"""`pixal3d-rt bench`: the whole pipeline, image to GLB, stage by stage, at real scale and on budgets.

Each resolution runs in a fresh worker process (so its first image is a cold start): load the
networks, run the images (`runs` times; the first is cold, the rest warm), optionally count each
stage's FLOPs and bytes (one eager pass) for the roofline projection, and last run once per memory
budget under the memory planner's plan for it, with the torch allocator capped at the budget less
the process's measured non-torch memory (so a plan that underestimates fails).
Per stage a `StageRecorder` (a progress.Progress) takes wall time, GPU time (CUDA events), torch's
allocator peak (reset per stage), the process's device-memory peak as NVML reports it (sampled by a
thread every few ms: CUDA context and every library included) and the host RSS peak. The parent
writes bench.json, bench.md and the charts (matplotlib, the `[bench]` extra).

Optional packages: nvidia-ml-py (NVML), matplotlib (charts). Without NVML the device peak is
reported as unavailable; without matplotlib the charts are skipped with a note.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .progress import Progress
from .runtime.memory import NvmlProbe, nvml_index
from .runtime.stages import RUN_STAGES

SAMPLE_PERIOD_S = 0.005
GIB = 2**30
# published specs: memory (GiB), dense bf16 tensor throughput with fp32 accumulation (TFLOP/s) and
# memory bandwidth (GB/s), from NVIDIA's Ampere GA10x / Ada / Blackwell RTX architecture papers
GPU_PROFILES = {
    "rtx3060-12gb": {"memory_gib": 12, "bf16_tflops": 25.6, "bandwidth_gbs": 360},
    "rtx4070-12gb": {"memory_gib": 12, "bf16_tflops": 58.3, "bandwidth_gbs": 504},
    "rtx4080-16gb": {"memory_gib": 16, "bf16_tflops": 97.5, "bandwidth_gbs": 717},
    "rtx4090-24gb": {"memory_gib": 24, "bf16_tflops": 165.2, "bandwidth_gbs": 1008},
    "rtx5090-32gb": {"memory_gib": 32, "bf16_tflops": 209.5, "bandwidth_gbs": 1792},
}
# stages that run on the host (their time does not scale with the GPU)
HOST_STAGES = {"preprocess"}
# the custom GPU kernels whose calls a CUDA run counts (that the fast paths are the ones that ran);
# their callers look them up in these modules at call time
CUSTOM_KERNELS = {"pixal3d_rt.kernels.sparse_conv_triton": "subm_conv3d_triton",
                  "pixal3d_rt.kernels.backproject_triton": "backproject", "pixal3d_rt.kernels.na2d_triton": "na2d_at_triton"}


# ---------------------------------------------------------------------------------------------
# memory probes


def host_rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil  # non-Linux hosts

        return psutil.Process().memory_info().rss


class MemorySampler:
    """A thread sampling NVML device memory and host RSS every SAMPLE_PERIOD_S; `mark()` starts a
    new window, `peaks()` gives the window's maxima."""

    def __init__(self, nvml: NvmlProbe):
        self.nvml = nvml
        self.lock = threading.Lock()
        self.samples = 0
        self.mark()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="bench-memory-sampler")
        self.thread.start()

    def _sample(self):
        dev, rss = self.nvml.read(), host_rss_bytes()
        with self.lock:
            self.samples += 1
            if dev is not None:
                self.dev_peak = max(self.dev_peak or 0, dev)
            self.rss_peak = max(self.rss_peak, rss)

    def _loop(self):
        while not self._stop.wait(SAMPLE_PERIOD_S):
            self._sample()

    def mark(self):
        with self.lock:
            self.dev_peak, self.rss_peak = None, 0
        self._sample()

    def peaks(self) -> tuple:
        self._sample()
        with self.lock:
            return self.dev_peak, self.rss_peak

    def stop(self):
        self._stop.set()
        self.thread.join()


# ---------------------------------------------------------------------------------------------
# per-stage recording


class StageRecorder(Progress):
    """Takes a row per finished stage: wall and GPU time, torch and NVML device peaks, host RSS peak."""

    def __init__(self, device, sampler: MemorySampler, counter=None):
        import torch

        self.torch = torch
        self.cuda = str(device).startswith("cuda")
        self.sampler = sampler
        self.counter = counter
        self.rows: list[dict] = []
        self.open: dict = {}
        self.oom_notes: list[dict] = []

    def stage(self, name, detail=""):
        torch = self.torch
        mark = {"t": time.perf_counter(), "detail": detail}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            mark["allocated"] = int(torch.cuda.memory_allocated())  # live at the start: peak - this = the stage's own
            mark["reserved"] = int(torch.cuda.memory_reserved())  # held by the allocator as it starts (graph pools too)
            mark["event"] = torch.cuda.Event(enable_timing=True)
            mark["event"].record()
        if self.counter is not None:
            mark["counts"] = self.counter.snapshot()
        self.sampler.mark()
        self.open[name] = mark

    def stage_done(self, name, seconds, detail=""):
        torch = self.torch
        mark = self.open.pop(name, None)
        if mark is None:
            return
        row = {"stage": name, "detail": detail or mark["detail"], "wall_s": seconds}
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            row["gpu_s"] = mark["event"].elapsed_time(end) / 1000.0
            row["torch_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            row["torch_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
            row["torch_start_allocated_bytes"] = mark["allocated"]
            row["torch_start_reserved_bytes"] = mark["reserved"]
        else:
            row["gpu_s"] = row["torch_peak_allocated_bytes"] = row["torch_peak_reserved_bytes"] = None
        dev, rss = self.sampler.peaks()
        row["nvml_peak_bytes"] = dev
        row["host_rss_peak_bytes"] = rss
        if self.counter is not None:
            row.update(self.counter.since(mark["counts"]))
        self.rows.append(row)

    def note(self, text):
        """A stage that ran out of memory is retried (Pipeline._run_stage): what the allocator held then."""
        if self.cuda and "out of memory" in text:
            from .runtime.memory import device_memory_breakdown

            self.oom_notes.append({"note": text[:600], "memory": device_memory_breakdown()})

    def failed_stage(self):
        """The stage that was running when an exception left the pipeline (None if none was)."""
        return next(reversed(self.open), None) if self.open else None


class KernelCalls:
    """Counts the calls of CUSTOM_KERNELS while entered (their module attributes wrapped)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.counts, self.saved = enabled, {}, []

    def __enter__(self):
        import importlib

        if not self.enabled:
            return self
        for module_name, fn_name in CUSTOM_KERNELS.items():
            module = importlib.import_module(module_name)
            fn = getattr(module, fn_name)
            self.counts[fn_name] = 0

            def counted(*args, _fn=fn, _name=fn_name, **kwargs):
                self.counts[_name] += 1
                return _fn(*args, **kwargs)

            self.saved.append((module, fn_name, fn))
            setattr(module, fn_name, counted)
        return self

    def __exit__(self, *exc):
        for module, fn_name, fn in self.saved:
            setattr(module, fn_name, fn)
        self.saved = []


# ---------------------------------------------------------------------------------------------
# FLOP and byte counting (roofline projection)


class OpCounter:
    """Counts FLOPs (torch's flop registry: matmuls, convolutions, attention) and bytes (every
    non-view op's tensor inputs and outputs, i.e. unfused traffic) of the aten ops that run, plus
    the sparse convolutions (Triton kernels torch does not see) from their neighbour maps."""

    def __init__(self, models):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.flop_counter import flop_registry

        import torch
        from .models.sc_vae import SubMConv3d

        counter = self
        self.flops = 0
        self.bytes = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                if packet in flop_registry:
                    counter.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
                view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
                if not view:
                    counter.bytes += sum(t.nbytes for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
                return out

        self.mode = Mode()
        self.hooks = []

        def conv_hook(mod, inputs, output):
            feats, nmap = inputs[0], inputs[1]
            pairs = int((nmap >= 0).sum())
            counter.flops += 2 * pairs * mod.in_channels * mod.out_channels
            counter.bytes += pairs * mod.in_channels * feats.element_size() + output.nbytes + mod.weight.nbytes

        for m in models:
            for mod in m.modules():
                if isinstance(mod, SubMConv3d):
                    self.hooks.append(mod.register_forward_hook(conv_hook))

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for h in self.hooks:
            h.remove()

    def snapshot(self):
        return (self.flops, self.bytes)

    def since(self, snap):
        return {"flops": self.flops - snap[0], "bytes_moved": self.bytes - snap[1]}


def roofline(flops: float, nbytes: float, tflops: float, gbs: float) -> float:
    return max(flops / (tflops * 1e12), nbytes / (gbs * 1e9))


# ---------------------------------------------------------------------------------------------
# environment


_NOT_SWITCHES = ("PIXAL3D_COMMIT", "PIXAL3D_GOLDEN", "PIXAL3D_BENCH_TMP")  # names and paths, not behaviour


def environment(device) -> dict:
    import torch

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "device": str(device), "cpu_count": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        from importlib.metadata import version

        env["pixal3d_rt"] = version("pixal3d-rt")
    except Exception:
        env["pixal3d_rt"] = None
    env.update(git_commit())
    # the switches a run was made under (kernels off, opt-in variants): a result names its variant
    env["switches"] = {k: v for k, v in sorted(os.environ.items())
                       if (k.startswith("PIXAL3D_") and k not in _NOT_SWITCHES) or k == "PYTORCH_CUDA_ALLOC_CONF"}
    return env


def gpu_environment(nvml: NvmlProbe) -> dict:
    """The GPU a worker runs on (taken in the worker: the parent makes no CUDA context of its own)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": props.name, "gpu_memory_bytes": int(props.total_memory), "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "driver": getattr(nvml, "driver", None), "nvml": nvml.source,
            "nvml_idle_used_bytes": getattr(nvml, "idle_used", None)}


def git_commit() -> dict:
    """The checkout's commit; PIXAL3D_COMMIT wins (a copy of the tree without its history)."""
    if os.environ.get("PIXAL3D_COMMIT"):
        return {"commit": os.environ["PIXAL3D_COMMIT"]}
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout
        return {"commit": sha or None, "tracked_files_modified": len(dirty.splitlines())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


# ---------------------------------------------------------------------------------------------
# the worker: one resolution in a fresh process


def _one_run(pipe, recorder, image, resolution, seed, steps, glb_path, glb=True, vram_budget=None):
    import torch

    t0 = time.perf_counter()
    result = pipe.run(image, resolution=resolution, seed=seed, steps=steps, progress=recorder, vram_budget=vram_budget)
    stats = result.save_glb(glb_path, progress=recorder) if glb else {}
    total = time.perf_counter() - t0
    finite = bool(torch.isfinite(result.vertices).all()) and (result.voxel_attrs is None or bool(torch.isfinite(result.voxel_attrs).all()))
    glb_steps = [{"stage": f"glb_{k}", "wall_s": v, "part_of": "glb_export"} for k, v in stats.get("glb_timings", {}).items()
                 if k != "total"]
    return {"total_wall_s": total, "tokens": dict(result.tokens), "mesh_faces": int(result.faces.shape[0]),
            "mesh_vertices": int(result.vertices.shape[0]), "glb_faces": stats.get("faces"),
            "glb_bytes": stats.get("bytes"), "texture_size": stats.get("texture_size"), "finite": finite,
            "stages": recorder.rows, "glb_steps": glb_steps}


def _release(pipe):
    import torch

    for flow in pipe.flows.values():
        pipe._release(flow)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _load(args, sampler):
    import torch

    from .pipeline import Pipeline
    from .presets import preset_structure

    recorder = StageRecorder(args["device"], sampler)
    recorder.stage("load", "networks")
    t0 = time.perf_counter()
    files = args.get("weights") or args.get("host_store_dir")
    if args.get("host_budget_gib") is not None and args.get("budgets_gib") and files:
        # as `infer --weights W --vram-budget B --host-budget H` loads: nothing on the device, the flows
        # and decoders read per stage from their files into a host store
        pipe = Pipeline.from_pretrained(files, device=args["device"], resolution=args["resolution"], backend=args.get("backend"),
                                        vram_budget=float(args["budgets_gib"][0]), host_budget=float(args["host_budget_gib"]))
        if args.get("preset"):  # the preset's structure (token counts of a real object) over its written weights
            pipe.structure = preset_structure(args["preset"])
    elif args.get("preset"):
        pipe = Pipeline.from_preset(args["preset"], device=args["device"], backend=args.get("backend"))
    else:
        pipe = Pipeline.from_pretrained(args["weights"], device=args["device"], resolution=args["resolution"],
                                        backend=args.get("backend"))
    if str(args["device"]).startswith("cuda"):
        torch.cuda.synchronize()
    recorder.stage_done("load", time.perf_counter() - t0)
    return pipe, recorder.rows[0]


def run_worker(args: dict, save=lambda part: None) -> dict:
    """One resolution: load, cold + warm runs, budgets, optional counting pass. Returns a JSON dict;
    `save(part)` is called after each phase, so a crash later keeps what was measured."""
    import torch

    from .preprocess import load_image

    device = args["device"]
    cuda = str(device).startswith("cuda")
    nvml = NvmlProbe(nvml_index(device) if cuda else None)  # before the first CUDA call: its idle reading
    sampler = MemorySampler(nvml)
    import tempfile

    res = args["resolution"]
    part = {"resolution": res, "nvml_source": nvml.source, "runs": [], "budgets": [], "worker_pid": os.getpid()}
    if cuda:
        part["gpu_environment"] = gpu_environment(nvml)
    pipe, part["load"] = _load(args, sampler)
    part["structure"] = getattr(pipe.structure, "name", None)
    images = [Path(p) for p in args["images"]]
    glb = Path(tempfile.mkdtemp(prefix="pixal3d-bench-")) / f"bench_{res}.glb"
    for i in range(args["runs"]):
        image = images[i % len(images)]
        rec = StageRecorder(device, sampler)
        glb_runs = args.get("glb_runs")
        with KernelCalls(enabled=cuda) as calls:
            run = _one_run(pipe, rec, load_image(image), res, args["seed"], args["steps"], glb, glb=glb_runs is None or i < glb_runs)
        if cuda:
            run["custom_kernel_calls"] = calls.counts
        run.update({"index": i, "image": str(image), "kind": "cold" if i == 0 else "warm"})
        part["runs"].append(run)
        _say(f"[bench {res}] run {i} ({run['kind']}): {run['total_wall_s']:.2f} s, {run['mesh_faces']:,} faces")
        save(part)
    if args.get("count"):
        part["counted"] = _count_pass(pipe, args, sampler, load_image(images[0]), glb)
        save(part)
    if args.get("upstream"):
        from .bench_upstream import upstream_pass
        from .errors import first_line

        try:
            part["upstream"] = upstream_pass(pipe, args, load_image(images[0]), args["upstream"],
                                             say=lambda m: _say(f"[bench {res}] {m}"))
        except Exception as e:  # what failed is reported; the other phases still run
            part["upstream"] = {"dir": args["upstream"], "error": f"{type(e).__name__}: {first_line(e)}"}
        save(part)
    if args.get("quality"):  # it builds fp32 and bf16 copies of the networks
        from .bench_quality import quality_pass

        part["quality"] = quality_pass(pipe, args, load_image(images[0]), say=lambda m: _say(f"[bench {res}] {m}"))
        save(part)
    if cuda and part["runs"]:
        # the device memory outside torch's allocator once every kernel ran: the budget runs' caps leave it out
        part["non_torch_overhead_bytes"] = _non_torch_overhead(nvml)
        warm = [r for r in part["runs"] if r["kind"] == "warm"]  # a cold run's time says nothing of the budget's cost
        part["unbudgeted_baseline_s"] = _baseline_seconds(warm[-1]) if warm else None
        save(part)
    if args.get("host_budget_gib") is not None and part["runs"] and not args.get("weights"):
        part["host_store_dir"] = _write_preset_weights(pipe)  # for the budget workers' host stores
        save(part)
    if cuda and args.get("budgets_gib"):  # last: the budget runs move the weights to the host
        if pipe.host_store is not None:
            part["host_store"] = {"budget_gib": args["host_budget_gib"], "held_bytes_at_start": pipe.host_store.held_bytes(),
                                  "weights": str(args.get("weights") or "written from the preset")}
        overhead = args.get("non_torch_overhead_bytes", part.get("non_torch_overhead_bytes"))
        baseline = args.get("baseline_s", part.get("unbudgeted_baseline_s"))
        for budget in args["budgets_gib"]:
            part["budgets"].append(_budget_run(pipe, args, sampler, nvml, load_image(images[0]), glb, budget,
                                               overhead, baseline))
            save(part)
    sampler.stop()
    part["sampler_samples"] = sampler.samples
    return part


def _baseline_seconds(warm: dict) -> float:
    """The budget runs write no GLB: the same whole `pipe.run` call of an unbudgeted warm run."""
    if warm.get("glb_faces") is None:
        return warm["total_wall_s"]
    return sum(r["wall_s"] for r in warm["stages"] if r["stage"] in RUN_STAGES)


def _count_pass(pipe, args, sampler, image, glb):
    """FLOPs and bytes per stage, counted on the eager path (CUDA graphs hide their ops)."""
    from .pipeline import Pipeline

    eager = Pipeline(pipe.w, device=pipe.device, geometry=pipe.geometry, preset=pipe.preset, backend="eager")
    eager.structure = pipe.structure
    models = [pipe.models[k] for k in ("shape_slat_decoder", "tex_slat_decoder") if k in pipe.models]
    counter = OpCounter(models)
    rec = StageRecorder(args["device"], sampler, counter=counter)
    with counter:
        result = eager.run(image, resolution=args["resolution"], seed=args["seed"], steps=args["steps"], progress=rec)
    _release(eager)
    del result
    return [{"stage": r["stage"], "flops": r["flops"], "bytes_moved": r["bytes_moved"]} for r in rec.rows]


def _write_preset_weights(pipe) -> str:
    """The preset's networks in the official layout in a temporary folder, for `--host-budget` runs
    that read them per stage as `infer --weights W --host-budget` does."""
    import tempfile

    from .checkpoints import write_weights

    t0 = time.perf_counter()
    d = write_weights(pipe.w, Path(tempfile.mkdtemp(prefix="pixal3d-bench-weights-")))
    _say(f"[bench] preset weights written to {d} in {time.perf_counter() - t0:.1f} s")
    return str(d)


def _non_torch_overhead(nvml: NvmlProbe) -> int | None:
    """Device memory the process holds outside torch's allocator (context, cuBLAS/cuDNN workspaces
    outside it, kernel images): NVML's figure less torch's reserved bytes, at rest."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    time.sleep(0.05)
    used = nvml.read()
    return None if used is None else int(used - torch.cuda.memory_reserved())


def _budget_run(pipe, args, sampler, nvml, image, glb, budget_gib, overhead, baseline_s=None):
    """One run planned inside the budget (runtime/planner.py) with torch's allocator capped at it less
    the non-torch overhead, so that a plan that underestimates fails instead of passing unseen. Per
    stage the predicted peak beside the measured ones; the time against the unbudgeted warm run."""
    import torch

    from .errors import BudgetError, Pixal3DError, StageOutOfMemory

    total = torch.cuda.get_device_properties(0).total_memory
    cap = budget_gib * GIB - (overhead or 0)
    # the GLB export runs on the host apart from its bake; its device peak is in the runs' glb_export rows
    row = {"budget_gib": budget_gib, "torch_cap_bytes": int(cap), "scope": "image to decoded mesh and voxels",
           "scheduler": "runtime/planner.py"}
    done = []  # the stages that finished under the cap
    done_runs = []  # per finished run, its stage rows
    pipe.offload()  # every network to the host (flows unloaded): the plan places them
    _release(pipe)
    # what the process still holds as the run starts (memory the cap cannot take back: cached segments
    # the allocator reuses without asking, graph pools): a budget run is only clean when this is small
    row["held_at_start"] = {"torch_allocated_bytes": int(torch.cuda.memory_allocated()),
                            "torch_reserved_bytes": int(torch.cuda.memory_reserved()), "nvml_bytes": nvml.read()}
    if cap <= torch.cuda.memory_allocated():
        row.update({"passed": False, "failed_stage": "load",
                    "error": f"resident weights {torch.cuda.memory_allocated() / GIB:.1f} GiB exceed the cap of {cap / GIB:.1f} GiB"})
    else:
        torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, cap / total)))
        torch.cuda.reset_peak_memory_stats()
        if os.environ.get("PIXAL3D_MEMORY_HISTORY", "0") == "1":  # where each block held at a failure was allocated
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        sampler.mark()
        rec = StageRecorder(args["device"], sampler)
        recs = [rec]
        t0 = time.perf_counter()
        try:
            # the first run places the weights from the host; later ones keep what the plan keeps resident
            walls = []
            for k in range(max(1, int(args.get("budget_runs") or 1))):
                if k:
                    rec = StageRecorder(args["device"], sampler)
                    recs.append(rec)
                run = _one_run(pipe, rec, image, args["resolution"], args["seed"], args["steps"], glb, glb=False,
                               vram_budget=budget_gib)
                walls.append(run["total_wall_s"])
                done_runs.append(rec.rows)
            row.update({"passed": True, "total_wall_s": walls[-1], "runs_wall_s": walls})
            if baseline_s:
                row["time_ratio_vs_unbudgeted"] = walls[-1] / baseline_s
                row["first_run_time_ratio_vs_unbudgeted"] = walls[0] / baseline_s
        except BudgetError as e:
            if isinstance(e, StageOutOfMemory) or "out of GPU memory" in str(e):
                row.update({"passed": False, "failed_stage": rec.failed_stage(), "error": str(e).splitlines()[0][:300],
                            "wall_s_until_failure": time.perf_counter() - t0})
            else:  # refused before any stage: no plan fits
                row.update({"passed": False, "failed_stage": "plan", "error": str(e).splitlines()[0][:300]})
        except (torch.cuda.OutOfMemoryError, Pixal3DError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            row.update({"passed": False, "failed_stage": rec.failed_stage(), "error": str(e).splitlines()[0][:300],
                        "wall_s_until_failure": time.perf_counter() - t0})
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        if not row["passed"]:
            from .runtime.memory import device_memory_breakdown

            row["memory_at_failure"] = device_memory_breakdown()
        torch.cuda.memory._record_memory_history(enabled=None)
        row["out_of_memory_retries"] = [n for r in recs for n in r.oom_notes]
        row["stages_done"] = [r["stage"] for r in rec.rows]
        # every run's stages count for the peaks (the last one's, finished or not, for the times)
        done = [r for rows in done_runs if rows is not rec.rows for r in rows] + rec.rows
        plan = pipe.last_plan
        if plan is not None:
            last = {r["stage"]: r for r in rec.rows}

            def peak(stage, key):
                values = [r[key] for r in done if r["stage"] == stage and r.get(key) is not None]
                return max(values) if values else None

            row["plan"] = [{"stage": sp.stage, "weights": dict(sp.weights), "knobs": sp.knobs(),
                            "predicted_peak_bytes": sp.predicted_peak, "predicted_s": sp.predicted_seconds,
                            "nvml_peak_bytes": peak(sp.stage, "nvml_peak_bytes"),
                            "torch_peak_allocated_bytes": peak(sp.stage, "torch_peak_allocated_bytes"),
                            "torch_start_reserved_bytes": last.get(sp.stage, {}).get("torch_start_reserved_bytes"),
                            "wall_s": last.get(sp.stage, {}).get("wall_s")} for sp in plan.stages]
        row["torch_peak_allocated_bytes"] = max([r["torch_peak_allocated_bytes"] or 0 for r in done] + [int(torch.cuda.max_memory_allocated())])
    dev, _ = sampler.peaks()  # the window of the stage that was running (or of the check above)
    peaks = [p for p in [r["nvml_peak_bytes"] for r in done] + [dev] if p is not None]
    row["nvml_peak_bytes"] = max(peaks) if peaks else None
    rss = [r["host_rss_peak_bytes"] for r in done if r.get("host_rss_peak_bytes") is not None]
    row["host_rss_peak_bytes"] = max(rss) if rss else None
    pipe._release_placements(everything=True)
    _release(pipe)
    _say(f"[bench {args['resolution']}] budget {budget_gib} GiB: {'pass' if row['passed'] else 'OOM in ' + str(row.get('failed_stage'))}")
    return row


def _is_oom(e: BaseException) -> bool:
    import torch

    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "out of GPU memory" in text


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the parent: workers, report, charts


def run_bench(preset=None, weights=None, resolutions=(1024,), images=(), runs=2, backend=None, out_dir="bench-out",
              device=None, seed=42, steps=None, budgets_gib=(), budget_runs=2, host_budget_gib=None, gpu_profiles=(), glb_runs=None, quality=False,
              engines=None, upstream=None, say=_say) -> dict:
    """Run every resolution in its own worker process and write bench.json, bench.md and charts to
    out_dir. Returns the report dict."""
    import torch

    _stop_on_sigterm()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [str(Path(p).resolve()) for p in images] or [str(example_image())]
    budgets = list(budgets_gib) + [GPU_PROFILES[p]["memory_gib"] for p in gpu_profiles]
    budgets = sorted(set(budgets), reverse=True)
    settings = {"preset": preset, "weights": str(weights) if weights else None, "resolutions": list(resolutions),
                "images": images, "runs": runs, "backend": backend, "device": device, "seed": seed, "steps": steps,
                "budgets_gib": budgets, "budget_runs": int(budget_runs), "host_budget_gib": host_budget_gib, "gpu_profiles": list(gpu_profiles), "glb_runs": glb_runs, "quality": bool(quality),
                "engines": str(Path(engines).resolve()) if engines else None,
                "upstream": str(Path(upstream).resolve()) if upstream else None}
    report = {"kind": "bench", "environment": environment(device), "settings": settings, "resolutions": []}
    if preset == "reference":
        report["note"] = ("reference preset: full-size networks with seeded random weights and a reference shape's "
                          "structure (a procedural mug); timings and memory are real, the assets are not generations")
    elif preset:
        report["note"] = f"{preset} preset: small random networks (structural demo)"
    for res in resolutions:
        job = {**settings, "resolution": int(res), "out": str(out), "budgets_gib": [], "count": bool(gpu_profiles)}
        say(f"[bench] resolution {res}: fresh worker process")
        part, stopped = _worker_process(job, out, f"{res}")
        report["resolutions"].append(part)
        report["environment"].update(part.get("gpu_environment", {}))
        write_report(report, out, say)  # what is done so far survives a later failure
        # each budget in a fresh process: memory the unbudgeted runs left cached (which the allocator
        # reuses without asking the cap) cannot hide in it, and it starts as `infer --vram-budget` does
        store_dir = part.pop("host_store_dir", None)
        for budget in (budgets if device.startswith("cuda") and stopped is None else []):
            bjob = {**job, "runs": 0, "count": False, "quality": False, "upstream": None, "budgets_gib": [budget],
                    "baseline_s": part.get("unbudgeted_baseline_s"), "host_store_dir": store_dir,
                    "non_torch_overhead_bytes": part.get("non_torch_overhead_bytes")}
            say(f"[bench] resolution {res}, budget {budget} GiB: fresh worker process")
            bpart, stopped = _worker_process(bjob, out, f"{res}_budget_{budget}")
            rows = bpart.get("budgets") or [{"budget_gib": budget, "passed": False, "failed_stage": "worker",
                                             "error": bpart.get("error", "no row recorded")}]
            if "error" in bpart:  # a crash, not a measurement (running out of memory is recorded in its row)
                part.setdefault("error", f"budget {budget} GiB: {bpart['error']}")
            for row in rows:
                row["worker_pid"] = bpart.get("worker_pid")
            part["budgets"].extend(rows)
            if bpart.get("host_store"):
                part["host_store"] = bpart["host_store"]
            write_report(report, out, say)
            if stopped is not None:
                break
        if store_dir:
            shutil.rmtree(store_dir, ignore_errors=True)
        if stopped is not None:
            raise stopped
    return report


def _worker_process(job: dict, out: Path, tag: str) -> tuple[dict, BaseException | None]:
    """Run one bench worker (python -m pixal3d_rt.bench) on `job`; returns what it recorded (an
    "error" key when it failed) and the KeyboardInterrupt/SystemExit that stopped it, if one did."""
    part_path, job_path = out / f"worker_{tag}.json", out / f"job_{tag}.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-m", "pixal3d_rt.bench", str(job_path), str(part_path)])
    stopped = None
    try:
        status = proc.wait()
    except (KeyboardInterrupt, SystemExit) as e:  # the worker stops too; what it saved is reported
        proc.terminate()
        status, stopped = proc.wait(), e
    if part_path.is_file():
        part = json.loads(part_path.read_text())
        if status != 0:  # what it measured before it failed is kept
            part["error"] = f"worker exited with status {status} after what is recorded here"
        part_path.unlink()
    else:
        part = {"resolution": job["resolution"], "error": f"worker exited with status {status}"}
    job_path.unlink()
    return part, stopped


def _retried_stages(budget_row: dict) -> str:
    """The stages a budget run retried after running out of memory, in all its runs ("" for none)."""
    names = [r["note"].split(":", 1)[0] for r in budget_row.get("out_of_memory_retries") or []]
    return ", ".join(f"{n} ×{names.count(n)}" if names.count(n) > 1 else n for n in dict.fromkeys(names))


def write_report(report: dict, out: Path, say=_say, with_charts: bool = True) -> dict:
    """bench.json, bench.md and (with_charts) the charts of a report, in `out`."""
    profiles = report["settings"].get("gpu_profiles")
    if profiles:
        report["projections"] = projections(report, profiles)
    if with_charts:
        report["charts"] = charts(report, out, say)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(report))
    return report


def example_image() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "mug.png"


def waterfall(run: dict) -> list[dict]:
    """The run's stages in order, the GLB steps after glb_export, with start offsets."""
    rows, t = [], 0.0
    for r in run["stages"]:
        rows.append({**r, "start_s": t})
        if r["stage"] == "glb_export":
            sub = t
            for s in run["glb_steps"]:
                rows.append({**s, "start_s": sub})
                sub += s["wall_s"]
        t += r["wall_s"]
    return rows


def projections(report: dict, profiles) -> list[dict]:
    """Per resolution and card: each stage's roofline time from its counted FLOPs and bytes and the
    card's published throughput and bandwidth; labelled a projection."""
    out = []
    measured_gpu = report["environment"].get("gpu")
    for part in report["resolutions"]:
        counted = {r["stage"]: r for r in part.get("counted", [])}
        warm = next((r for r in part.get("runs", []) if r["kind"] == "warm"), (part.get("runs") or [None])[0])
        if not counted or warm is None:
            continue
        for name in profiles:
            p = GPU_PROFILES[name]
            stages, total = [], 0.0
            for r in warm["stages"]:
                c = counted.get(r["stage"])
                if r["stage"] in HOST_STAGES or r["stage"] == "glb_export" or c is None:
                    t, how = r["wall_s"], "host: measured time kept"
                    if r["stage"] == "glb_export":
                        how = "mostly host steps: measured time kept"
                else:
                    t, how = roofline(c["flops"], c["bytes_moved"], p["bf16_tflops"], p["bandwidth_gbs"]), "roofline"
                stages.append({"stage": r["stage"], "projected_s": t, "basis": how, "flops": c and c["flops"],
                               "bytes_moved": c and c["bytes_moved"], "measured_s": r["wall_s"]})
                total += t
            out.append({"label": "projection", "card": name, **p, "resolution": part["resolution"],
                        "measured_on": measured_gpu, "stages": stages, "projected_total_s": total,
                        "memory_budget": next((b for b in part.get("budgets", []) if b["budget_gib"] == p["memory_gib"]), None)})
    return out


def _gb(n):
    return "–" if n is None else f"{n / 1e9:.2f}"


def markdown(report: dict) -> str:
    env, lines = report["environment"], []
    lines.append(f"# pixal3d-rt bench: {report['settings'].get('preset') or report['settings'].get('weights')}")
    lines.append("")
    lines.append(f"{env.get('gpu', env['device'])}, driver {env.get('driver', '–')}, torch {env['torch']}, triton {env.get('triton')}, "
                 f"commit {str(env.get('commit'))[:10]}, {env['date_utc']}")
    if env.get("switches"):
        lines.append("switches: " + ", ".join(f"{k}={v}" for k, v in env["switches"].items()))
    if report.get("note"):
        lines += ["", f"_{report['note']}_"]
    for part in report["resolutions"]:
        lines += ["", f"## resolution {part['resolution']}"]
        if "run_environment" in part:  # a merged report: each resolution from its own call
            re_ = part["run_environment"]
            lines.append(f"measured at commit {str(re_.get('commit'))[:10]}, {re_.get('date_utc')}")
        if "error" in part:
            lines.append(f"failed: {part['error']}")
        if "load" not in part:
            continue
        load = part["load"]
        lines.append(f"load {load['wall_s']:.2f} s (device peak {_gb(load['nvml_peak_bytes'])} GB NVML, "
                     f"{_gb(load['torch_peak_allocated_bytes'])} GB torch); memory source: {part['nvml_source']}")
        for run in part["runs"]:
            tok = ", ".join(f"{k} {v:,}" for k, v in run["tokens"].items())
            glb = f"GLB {run['glb_faces']:,}" if run["glb_faces"] is not None else "GLB export not run"
            lines += ["", f"### run {run['index']} ({run['kind']}): {run['total_wall_s']:.2f} s; {tok}; mesh {run['mesh_faces']:,} faces → {glb}"]
            if run.get("custom_kernel_calls"):
                lines += ["", "custom kernels called: " + ", ".join(f"{k} {v:,}" for k, v in run["custom_kernel_calls"].items())]
            lines += ["", "| stage | wall s | GPU s | torch peak GB | NVML peak GB | host RSS GB | detail |", "|---|---:|---:|---:|---:|---:|---|"]
            for r in waterfall(run):
                indent = "  ↳ " if r.get("part_of") else ""
                gpu = "–" if r.get("gpu_s") is None else f"{r['gpu_s']:.3f}"
                lines.append(f"| {indent}{r['stage']} | {r['wall_s']:.3f} | {gpu} | {_gb(r.get('torch_peak_allocated_bytes'))} | "
                             f"{_gb(r.get('nvml_peak_bytes'))} | {_gb(r.get('host_rss_peak_bytes'))} | {r.get('detail', '')} |")
        if part.get("budgets"):
            hs = part.get("host_store")
            store = f"; weights read per stage into a {hs['budget_gib']} GiB host store" if hs else ""
            lines += ["", f"### memory budgets (non-torch overhead {_gb(part.get('non_torch_overhead_bytes'))} GB{store})", "",
                      "| budget GiB | result | failed in | predicted peak GB | NVML peak GB | inside | torch peak GB | host RSS GB "
                      "| time vs unbudgeted (first run) | out-of-memory retries |",
                      "|---:|---|---|---:|---:|---|---:|---:|---:|---|"]
            for b in part["budgets"]:
                predicted = max((r["predicted_peak_bytes"] for r in b.get("plan") or []), default=None)
                ratio, first = b.get("time_ratio_vs_unbudgeted"), b.get("first_run_time_ratio_vs_unbudgeted")
                result = "pass" if b["passed"] else {"plan": "no plan", "worker": "error"}.get(b.get("failed_stage"), "OOM")
                times = "" if ratio is None else f"{ratio:.2f}×" + (f" ({first:.2f}×)" if first is not None else "")
                peak = b.get("nvml_peak_bytes")
                inside = "" if peak is None else ("yes" if peak <= b["budget_gib"] * GIB else "no")
                lines.append(f"| {b['budget_gib']} | {result} | {b.get('failed_stage') or ''} | {_gb(predicted)} | "
                             f"{_gb(peak)} | {inside} | {_gb(b.get('torch_peak_allocated_bytes'))} | "
                             f"{_gb(b.get('host_rss_peak_bytes'))} | {times} | {_retried_stages(b)} |")
            held = [(b["budget_gib"], b["held_at_start"]) for b in part["budgets"] if b.get("held_at_start")]
            if held:
                lines += ["", "held as each budget run started (NVML / torch reserved GB): " + ", ".join(
                    f"{g} GiB {_gb(h.get('nvml_bytes'))} / {_gb(h.get('torch_reserved_bytes'))}" for g, h in held)]
        if part.get("upstream"):
            from .bench_upstream import markdown as upstream_markdown

            up = part["upstream"]
            lines += ["", f"### side by side with upstream's modules: failed: {up['error']}"] if "error" in up else upstream_markdown(up)
        if part.get("quality"):
            from .bench_quality import markdown as quality_markdown

            lines += quality_markdown(part["quality"])
    for p in report.get("projections", []):
        mem = p["memory_budget"]
        fits = "–" if mem is None else ("fits" if mem["passed"] else f"does not fit today (OOM in {mem.get('failed_stage')})")
        lines += ["", f"### projection (roofline, not a measurement): {p['card']} at {p['resolution']}: "
                      f"{p['projected_total_s']:.1f} s; memory {p['memory_gib']} GiB: {fits}", "",
                  "| stage | projected s (projection) | measured s on " + str(p["measured_on"]) + " | basis |", "|---|---:|---:|---|"]
        for s in p["stages"]:
            lines.append(f"| {s['stage']} | {s['projected_s']:.3f} | {s['measured_s']:.3f} | {s['basis']} |")
    return "\n".join(lines) + "\n"


def charts(report: dict, out: Path, say=_say) -> list[str]:
    """waterfall.png (stage bars over time, every run of every resolution) and memory.png (peaks per
    stage of each resolution's last run)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("[bench] matplotlib is not installed (pip install 'pixal3d-rt[bench]'): no charts")
        return []
    parts = [p for p in report["resolutions"] if p.get("runs")]
    if not parts:
        return []
    runs = [(p["resolution"], run) for p in parts for run in p["runs"]]
    heights = [len(waterfall(run)) for _, run in runs]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1 + 0.2 * sum(heights) + 0.5 * len(runs)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (res, run) in zip(axes[:, 0], runs):
        rows = waterfall(run)
        ax.barh(range(len(rows)), [r["wall_s"] for r in rows], left=[r["start_s"] for r in rows],
                color=["tab:orange" if r.get("part_of") else "tab:blue" for r in rows])
        ax.set_yticks(range(len(rows)), [("   " if r.get("part_of") else "") + r["stage"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("seconds", fontsize=7)
        ax.set_title(f"{res}: run {run['index']} ({run['kind']}), {run['total_wall_s']:.1f} s", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "waterfall.png", dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(len(parts), 1, figsize=(10, 3.5 * len(parts)), squeeze=False)
    series = [("NVML process peak", "nvml_peak_bytes"), ("torch allocated peak", "torch_peak_allocated_bytes"),
              ("host RSS peak", "host_rss_peak_bytes")]
    for ax, part in zip(axes[:, 0], parts):
        run = part["runs"][-1]
        names = [r["stage"] for r in run["stages"]]
        for k, (label, key) in enumerate(series):
            ax.bar([i + (k - 1) * 0.27 for i in range(len(names))], [(r.get(key) or 0) / 1e9 for r in run["stages"]],
                   width=0.27, label=label)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("GB")
        ax.set_title(f"{part['resolution']}: peak memory per stage (run {run['index']}, {run['kind']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=80)
    plt.close(fig)
    return ["waterfall.png", "memory.png"]


def _stop_on_sigterm():
    """SIGTERM (e.g. from `timeout`) as SystemExit, so the parent stops its worker and reports."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv=None):
    """Worker entry: python -m pixal3d_rt.bench JOB.json PART.json"""
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    run_worker(job, save=lambda part: out.write_text(json.dumps(part)))


if __name__ == "__main__":
    main()
