"""`pixal3d-rt bench`: run the way a user runs it (a fresh process, the tiny preset on the CPU) and
check its files; the per-stage probes (host RSS peak per stage, FLOP and byte counts) on their own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pixal3d_rt.bench import MemorySampler, NvmlProbe, OpCounter, StageRecorder, roofline
from pixal3d_rt.bench_sections import SECTIONS
from pixal3d_rt.runtime.stages import stages_for

CLI = [shutil.which("pixal3d-rt", path=str(Path(sys.executable).parent)) or shutil.which("pixal3d-rt") or "pixal3d-rt"]
STAGES_1024 = [s.name for s in stages_for(1024, with_glb=True)]
GLB_STEPS = {"glb_clean", "glb_simplify", "glb_uv", "glb_bake", "glb_write"}


def _check_type(value, kind, where):
    assert isinstance(value, kind) and not isinstance(value, bool) or kind is bool and isinstance(value, bool), f"{where}: {value!r}"


def _positive(value, where):
    assert isinstance(value, (int, float)) and value > 0, f"{where}: {value!r}"


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIXAL3D_EXPANDABLE_SEGMENTS": "1"}  # a switch (CUDA only) to be recorded
    res = subprocess.run(CLI + ["bench", "--preset", "tiny", "--resolution", "1024", "--runs", "2", "--device", "cpu",
                                "--steps", "3", "--quality", "--out", str(out)], capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_bench_json_has_every_stage_with_positive_times_and_memory(tiny_bench):
    out, _ = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    for key, kind in (("kind", str), ("environment", dict), ("settings", dict), ("resolutions", list)):
        _check_type(report[key], kind, key)
    env = report["environment"]
    for key in ("date_utc", "python", "torch", "device", "commit"):
        assert env.get(key), key
    # the switches it ran under, and no path (the golden folder's) among them
    assert env["switches"].get("PIXAL3D_EXPANDABLE_SEGMENTS") == "1" and "PIXAL3D_GOLDEN" not in env["switches"]
    assert "switches: " in (out / "bench.md").read_text() and "PIXAL3D_EXPANDABLE_SEGMENTS=1" in (out / "bench.md").read_text()
    assert report["settings"]["preset"] == "tiny" and report["settings"]["runs"] == 2
    (part,) = report["resolutions"]
    assert part["resolution"] == 1024 and "error" not in part
    _positive(part["load"]["wall_s"], "load wall_s")
    _positive(part["load"]["host_rss_peak_bytes"], "load host RSS")
    assert [r["kind"] for r in part["runs"]] == ["cold", "warm"]
    for run in part["runs"]:
        names = [r["stage"] for r in run["stages"]]
        assert names == STAGES_1024
        assert GLB_STEPS <= {s["stage"] for s in run["glb_steps"]}
        for r in run["stages"]:
            where = f"run {run['index']} {r['stage']}"
            _positive(r["wall_s"], where + " wall_s")
            _positive(r["host_rss_peak_bytes"], where + " host_rss_peak_bytes")
            for key in ("gpu_s", "torch_peak_allocated_bytes", "nvml_peak_bytes"):  # no GPU in this run
                assert r[key] is None, where + " " + key
        for s in run["glb_steps"]:
            assert s["wall_s"] >= 0 and s["part_of"] == "glb_export"
        _positive(run["total_wall_s"], "total_wall_s")
        assert run["total_wall_s"] >= sum(r["wall_s"] for r in run["stages"][1:])  # stages lie within the run
        for key in ("ss_flow", "shape_lr_flow", "shape_hr_flow", "tex_flow", "voxels"):
            _positive(run["tokens"][key], key)
        _positive(run["mesh_faces"], "mesh_faces")
        _positive(run["glb_faces"], "glb_faces")
        assert run["finite"] is True
    assert part["runs"][0]["tokens"] == part["runs"][1]["tokens"]  # same image and seed


def test_bench_markdown_and_charts(tiny_bench):
    out, res = tiny_bench
    md = (out / "bench.md").read_text()
    for stage in STAGES_1024:
        assert f"| {stage} |" in md
    assert "run 0 (cold)" in md and "run 1 (warm)" in md
    for name in ("waterfall.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    assert "bench.json" in res.stdout


def test_merge_bench_writes_one_results_file_without_machine_paths(tiny_bench, tmp_path):
    out, _ = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    second = json.loads(json.dumps(report))  # another call's report at another resolution
    second["resolutions"][0]["resolution"] = 512
    second["environment"]["commit"] = "f" * 40
    (tmp_path / "b512.json").write_text(json.dumps(second))
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(repo / "benchmarks" / "merge_bench.py"), str(tmp_path / "bench_x"),
                          str(tmp_path / "b512.json"), str(out / "bench.json")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    merged_text = (tmp_path / "bench_x.json").read_text()
    merged = json.loads(merged_text)
    assert [p["resolution"] for p in merged["resolutions"]] == [512, 1024]
    assert merged["resolutions"][0]["run_environment"]["commit"] == "f" * 40
    assert str(repo) + "/" not in merged_text and merged["settings"]["images"] == ["examples/mug.png"]
    md = (tmp_path / "bench_x.md").read_text()
    assert "## resolution 512" in md and "## resolution 1024" in md and "measured at commit ffffffffff" in md
    for name in ("bench_x_waterfall.png", "bench_x_memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# every stage of the 1024 cascade that computes a tensor the quality column compares
QUALITY_STAGES = {"dinov3_lr", "dinov3_hr", "ss_flow", "ss_decoder", "shape_lr_cond", "shape_lr_flow", "shape_hr_cond",
                  "shape_hr_flow", "tex_cond", "tex_flow", "shape_decoder", "tex_decoder"}
BF16_BOUND = 0.05  # bf16 flows / fp16 decoders on the tiny preset measure ~1e-2 and below


def _quality(out):
    (part,) = json.loads((out / "bench.json").read_text())["resolutions"]
    q = part["quality"]
    return q, {p["path"]: p for p in q["paths"]}


def test_quality_paths_on_the_cpu(tiny_bench):
    q, paths = _quality(tiny_bench[0])
    assert q["reference"] == "fp32_eager" and q["resolution"] == 1024
    assert set(paths) == {"fp32_eager_repeat", "bf16_eager", "fp8_simulated"}
    assert {u["path"] for u in q["unavailable"]} == {"cuda", "engines"}
    for name, p in paths.items():
        assert "error" not in p, (name, p.get("error"))
        assert p["finite"] is True
        assert {r["stage"] for r in p["outputs"]} == QUALITY_STAGES, name
        for r in p["outputs"]:
            assert isinstance(r["rel_l2"], float) and 0 <= r["rel_l2"] < float("inf"), (name, r)
            if "coord_iou" in r:  # the paths follow the reference's structure: the same voxels
                assert r["coord_iou"] == 1.0, (name, r)
        for key in ("chamfer", "f_score", "precision", "recall"):
            assert isinstance(p["mesh"][key], float), (name, key)
        _positive(p["mesh"]["faces"], name + " faces")
    floor = q["mesh_metric"]["sampling_floor"]
    assert 0 < floor["chamfer"] < 0.01 and floor["f_score"] > 0.99


def test_quality_of_the_reference_path_against_itself_is_exact(tiny_bench):
    _, paths = _quality(tiny_bench[0])
    same = paths["fp32_eager_repeat"]
    assert all(r["rel_l2"] == 0.0 for r in same["outputs"]), same["outputs"]
    assert same["mesh"]["chamfer"] == 0.0 and same["mesh"]["f_score"] == 1.0
    flips = same["structure_flips"]
    assert flips["occupancy"]["coord_iou"] == 1.0 and flips["subdivision_decisions_changed"] == 0
    assert flips["subdivision_decisions"] > 0


def test_quality_of_bf16_is_a_small_nonzero_error(tiny_bench):
    _, paths = _quality(tiny_bench[0])
    bf16 = {r["stage"]: r["rel_l2"] for r in paths["bf16_eager"]["outputs"]}
    for stage in ("ss_flow", "shape_lr_flow", "shape_hr_flow", "tex_flow", "shape_decoder", "tex_decoder"):
        assert 0 < bf16[stage] < BF16_BOUND, (stage, bf16[stage])
    assert bf16["dinov3_lr"] == 0.0  # DINOv3 runs in fp32 on every path
    mesh = paths["bf16_eager"]["mesh"]
    assert 0 < mesh["chamfer"] < 0.01 and 0.9 < mesh["f_score"] <= 1.0
    fp8 = {r["stage"]: r["rel_l2"] for r in paths["fp8_simulated"]["outputs"]}
    assert bf16["shape_hr_flow"] < fp8["shape_hr_flow"] < 1.0  # E4M3 rounds coarser than bf16


def test_quality_table_in_the_markdown(tiny_bench):
    md = (tiny_bench[0] / "bench.md").read_text()
    assert "### quality against the fp32 eager path" in md
    assert "| stage | output | fp32_eager_repeat | bf16_eager | fp8_simulated |" in md
    for row in ("| mesh_extraction | mesh Chamfer |", "| mesh_extraction | mesh F-score@0.01 |", "| tex_flow | texture latent |"):
        assert row in md
    assert "- cuda: not run" in md and "- engines: not run" in md


def test_budget_table_in_the_markdown(tiny_bench):
    # budget runs need CUDA: their rows as a GPU worker records them, rendered from the CPU run's report
    from pixal3d_rt.bench import markdown

    report = json.loads((tiny_bench[0] / "bench.json").read_text())
    part = report["resolutions"][0]
    part["non_torch_overhead_bytes"] = 900_000_000
    part["host_store"] = {"budget_gib": 8, "weights": "written from the preset", "write_s": 12.0}
    part["budgets"] = [
        {"budget_gib": 6, "passed": True, "nvml_peak_bytes": 5_900_000_000, "torch_peak_allocated_bytes": 4_800_000_000,
         "host_rss_peak_bytes": 9_100_000_000, "time_ratio_vs_unbudgeted": 1.18, "first_run_time_ratio_vs_unbudgeted": 1.52,
         "plan": [{"stage": "shape_hr_flow", "predicted_peak_bytes": 5_700_000_000}],
         "out_of_memory_retries": [{"note": "tex_decoder: out of memory under the plan (...)"}] * 2
         + [{"note": "shape_decoder: out of memory under the plan (...)"}]},
        {"budget_gib": 3, "passed": False, "failed_stage": "plan", "nvml_peak_bytes": None,
         "torch_peak_allocated_bytes": None, "host_rss_peak_bytes": None},
        {"budget_gib": 4, "passed": True, "nvml_peak_bytes": 7_580_000_000, "torch_peak_allocated_bytes": 5_670_000_000,
         "held_at_start": {"nvml_bytes": 6_600_000_000, "torch_reserved_bytes": 5_800_000_000}},
        {"budget_gib": 2, "passed": False, "failed_stage": "worker", "error": "worker exited with status 1"},
    ]
    md = markdown(report)
    assert "non-torch overhead 0.90 GB; weights read per stage into a 8 GiB host store)" in md
    assert "| inside | torch peak GB | host RSS GB | time vs unbudgeted (first run) | out-of-memory retries |" in md
    # a pass that needed retries says which stages ran out of memory, and how often
    assert "| 6 | pass |  | 5.70 | 5.90 | yes | 4.80 | 9.10 | 1.18× (1.52×) | tex_decoder ×2, shape_decoder |" in md
    assert "| 3 | no plan | plan |" in md
    assert "| 2 | error | worker |" in md  # a crashed worker is not an out-of-memory measurement
    assert "| 4 | pass |  | – | 7.58 | no | 5.67 |" in md  # passed under the torch cap, above the budget on NVML
    assert "held as each budget run started (NVML / torch reserved GB): 4 GiB 6.60 / 5.80" in md


def test_quality_engines_needs_quality_and_an_engine_directory(tmp_path):
    base = CLI + ["bench", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)]
    res = subprocess.run(base + ["--quality-engines", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "give --quality too" in res.stderr
    res = subprocess.run(base + ["--quality", "--quality-engines", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "engine directory not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bench.json").exists()


# ---------------------------------------------------------------------------------------------
# --upstream: the refusal, and the plumbing on a stand-in package (upstream's source is never in the
# repository; the real comparison is a GPU run with its source)

STAND_IN = {  # upstream's module layout, each module re-exporting this project's definition
    "pixal3d/__init__.py": "raise ImportError(\"upstream's __init__ imports its whole pipeline: the benchmark must not run it\")\n",
    "pixal3d/models/__init__.py": "from pixal3d_rt.models.flow import SLatFlowModel, SparseStructureFlowModel  # noqa: F401\n"
                                  "from pixal3d_rt.models.sc_vae import FlexiDualGridVaeDecoder, SparseUnetVaeDecoder  # noqa: F401\n"
                                  "from pixal3d_rt.models.ss_decoder import SparseStructureDecoder  # noqa: F401\n",
    "pixal3d/models/sc_vaes/__init__.py": "",
    "pixal3d/models/sc_vaes/sparse_unet_vae.py": "from pixal3d_rt.models.sc_vae import SparseUnetVaeDecoder  # noqa: F401\n",
    "pixal3d/modules/sparse/__init__.py": "from pixal3d_rt.models.sparse import SparseTensor  # noqa: F401\n",
    "pixal3d/modules/image_feature_extractor.py": "from pixal3d_rt.models.dinov3 import extract_tokens\n\n\n"
                                                  "class DinoV3FeatureExtractor:\n    def __call__(self, image):\n"
                                                  "        return extract_tokens(self.model, image)\n",
}
UPSTREAM_COMPARED = {"dinov3_lr", "dinov3_hr", "ss_flow", "ss_decoder", "shape_lr_flow", "upsample", "shape_hr_flow", "tex_flow",
                     "shape_decoder", "tex_decoder"}


def _write_stand_in(root: Path) -> Path:
    for rel, text in STAND_IN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_upstream_refuses_a_folder_without_an_importable_package(tmp_path):
    base = CLI + ["bench", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out")]
    res = subprocess.run(base + ["--upstream", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--upstream" in res.stderr and "no upstream package here" in res.stderr
    broken = tmp_path / "broken"
    (broken / "pixal3d" / "models").mkdir(parents=True)
    (broken / "pixal3d" / "models" / "__init__.py").write_text("import flex_gemm_that_is_not_installed\n")
    res = subprocess.run(base + ["--upstream", str(broken)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "does not import here: ModuleNotFoundError" in res.stderr
    assert not (tmp_path / "out" / "bench.json").exists()


def test_upstream_side_by_side_plumbing_on_a_stand_in_package(tmp_path):
    """A stand-in made of this project's own modules in upstream's layout: every compared stage must
    give upstream's output equal to ours (same recorded inputs, same weights), positive times and
    ratio = ours / upstream; the stages upstream cannot run here are marked, not estimated."""
    import importlib.util

    out = tmp_path / "out"
    res = subprocess.run(CLI + ["bench", "--preset", "tiny", "--resolution", "1024", "--runs", "1", "--glb-runs", "0", "--device", "cpu",
                                "--steps", "2", "--upstream", str(_write_stand_in(tmp_path / "up")), "--out", str(out)],
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    (part,) = json.loads((out / "bench.json").read_text())["resolutions"]
    up = part["upstream"]
    assert "error" not in up, up.get("error")
    assert [r["stage"] for r in up["stages"]] == STAGES_1024
    for r in up["stages"]:
        if r["stage"] not in UPSTREAM_COMPARED:
            assert r["not_run"] and "ours_s" not in r, r
            continue
        assert "not_run" not in r, r
        _positive(r["ours_s"], r["stage"] + " ours_s")
        _positive(r["upstream_s"], r["stage"] + " upstream_s")
        assert r["ratio_ours_over_upstream"] == pytest.approx(r["ours_s"] / r["upstream_s"])
        if r["stage"] == "upsample":
            assert r["coord_iou_upstream_vs_ours"] == 1.0
        else:
            assert r["rel_l2_upstream_vs_ours"] == 0.0, r
    assert set(up["compared_total"]["stages"]) == UPSTREAM_COMPARED
    if importlib.util.find_spec("o_voxel") is None:
        assert any(s.startswith("o_voxel") for s in up["stand_ins"])
    md = (out / "bench.md").read_text()
    assert "### side by side with upstream's modules" in md and "| mesh_extraction | – | – | not run |" in md


# ---------------------------------------------------------------------------------------------
# --section: the kernel and network micro-benchmarks, each in its own process

CUDA_SECTIONS = sorted(n for n, s in SECTIONS.items() if s.cuda)
GPU_SECTION_ARGS = {  # the shortest run of each CUDA section
    "flows": ["--quick", "--sections=matmul,kernels"],
    "eager_baseline": ["--networks=ss_flow", "--rounds=1"],
    "sparse_conv": ["--decode-only"],
    "conditioning": [],
    "first_call": ["--variants=default"],
    "sustained": ["--seconds=0.2"],
    "attention_engines": ["--reps=2"],
}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_section_lists_its_options_on_any_machine(name, tmp_path):
    res = subprocess.run(CLI + ["bench", "--section", name, "--section-arg=--help", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"usage: pixal3d-rt bench --section {name}" in res.stdout and "--out" in res.stdout


def test_every_cuda_section_has_a_gpu_test_run():
    assert set(GPU_SECTION_ARGS) == set(CUDA_SECTIONS)


@pytest.mark.parametrize("name", CUDA_SECTIONS)
def test_cuda_sections_refuse_the_cpu_in_one_line(name, tmp_path):
    res = subprocess.run(CLI + ["bench", "--section", name, "--device", "cpu", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"section {name} needs a CUDA GPU" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", CUDA_SECTIONS)
def test_cuda_section_runs_on_a_gpu(name, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip(f"section {name} measures CUDA kernels: it runs on a machine with a CUDA GPU")
    args = [f"--section-arg={a}" for a in GPU_SECTION_ARGS[name]]
    res = subprocess.run(CLI + ["bench", "--section", name, *args, "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = tmp_path.glob(f"{SECTIONS[name].kind}_*.json")
    data = json.loads(path.read_text())
    assert isinstance(data, dict) and not data.get("errors"), data.get("errors")
    assert f"section {name}: {path}" in res.stdout


def test_sparse_conv_section_checks_its_code_on_the_cpu(tmp_path):
    res = subprocess.run(CLI + ["bench", "--section", "sparse_conv", "--section-arg=--smoke", "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "sparse_conv_cpu_smoke.json").read_text())
    assert data["settings"]["smoke"] is True and not data["errors"]
    for tag, d in data["decode"].items():
        assert "error" not in d and d["out_finite"] is True, (tag, d)
        assert d["level_counts"] == data["settings"]["counts"]
    assert data["decode"]["cold_cache"]["rel_l2_vs_reference"] < 1e-2  # the Triton decode against the torch one
    assert [lv["level"] for lv in data["levels"]] == [0, 1, 2]
    for lv in data["levels"]:
        for conv in lv["convs"]:
            assert conv["variants"]["table"]["rel_l2_vs_fp32"] < 1e-2, conv


def test_export_modes_section_on_the_cpu(tmp_path):
    res = subprocess.run(CLI + ["bench", "--section", "export_modes", "--section-arg=--grid=32", "--section-arg=--modes=fast,fast_xatlas",
                                "--section-arg=--texture-size=128", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "export_cpu.json").read_text())
    fast = data["runs"]["fast"]
    assert data["grid"] == 32 and fast["closed"] is True and fast["texture_size"] == 128
    _positive(fast["faces"], "faces")
    _positive(fast["steps"]["total"], "total")
    # the quality columns, and the xatlas variant's charts differ from the planar ones on the same mesh
    xat = data["runs"]["fast_xatlas"]
    for row in (fast, xat):
        _positive(row["charts"], "charts")
        _positive(row["texels_per_voxel"], "texels per voxel")
        assert 0 < row["coverage"] < 1 and {"uv", "stats", "normals"} <= set(row["steps"])
    assert xat["faces"] == fast["faces"] and xat["charts"] != fast["charts"]


def test_section_options_are_refused_where_they_do_not_apply(tmp_path):
    def run(*args):
        return subprocess.run(CLI + ["bench", *args, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)

    res = run("--section", "export_modes", "--preset", "tiny")
    assert res.returncode == 2 and "leave out --preset/--weights" in res.stderr
    res = run("--section-arg=--grid=32", "--preset", "tiny")
    assert res.returncode == 2 and "name the section" in res.stderr
    res = run("--section", "export_modes", "--upstream", str(tmp_path))
    assert res.returncode == 2 and "--upstream with --section is for" in res.stderr
    assert not list(tmp_path.glob("*.json"))


def test_kernel_calls_are_counted_and_restored(monkeypatch):
    import pixal3d_rt.bench as bench
    from pixal3d_rt.tools import metrics

    monkeypatch.setattr(bench, "CUSTOM_KERNELS", {"pixal3d_rt.tools.metrics": "rel_l2"})
    original = metrics.rel_l2
    x = torch.ones(3)
    with bench.KernelCalls() as calls:
        metrics.rel_l2(x, x), metrics.rel_l2(x, x)
    assert calls.counts == {"rel_l2": 2} and metrics.rel_l2 is original
    with bench.KernelCalls(enabled=False) as off:
        metrics.rel_l2(x, x)
    assert off.counts == {}


def test_bench_refuses_budgets_on_the_cpu(tmp_path):
    res = subprocess.run(CLI + ["bench", "--preset", "tiny", "--device", "cpu", "--vram-budget", "8", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "need a CUDA device" in res.stderr
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="budget runs cap torch's CUDA allocator")
def test_each_budget_runs_in_a_fresh_worker_that_starts_empty(tmp_path):
    """Memory the unbudgeted runs left cached would be reused under a budget run's cap unseen: every
    budget runs in its own worker process, which holds nothing but live tensors as it starts."""
    res = subprocess.run(CLI + ["bench", "--preset", "tiny", "--resolution", "512", "--runs", "2", "--glb-runs", "0",
                                "--steps", "2", "--vram-budget", "2,1", "--budget-runs", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    part = json.loads((tmp_path / "bench.json").read_text())["resolutions"][0]
    budgets = part["budgets"]
    assert [b["budget_gib"] for b in budgets] == [2.0, 1.0]
    pids = {b["worker_pid"] for b in budgets}
    assert len(pids) == 2 and part["worker_pid"] not in pids
    for b in budgets:
        assert b["passed"], b
        held = b["held_at_start"]
        assert held["torch_reserved_bytes"] - held["torch_allocated_bytes"] < 32 << 20
        assert b["time_ratio_vs_unbudgeted"] > 0  # against the first worker's warm run
        assert b["torch_cap_bytes"] == int(b["budget_gib"] * 2**30 - part["non_torch_overhead_bytes"])


def test_recorder_takes_the_host_peak_of_each_stage():
    sampler = _sampler()
    rec = StageRecorder("cpu", sampler)
    try:
        rec.stage("big")
        block = bytearray(400 << 20)  # touched pages count in RSS
        block[:: 4096] = b"\x01" * len(block[:: 4096])
        seen = sampler.samples
        while sampler.samples < seen + 3:  # the sampler thread sees RSS only while it holds the GIL
            time.sleep(0.005)
        del block
        rec.stage_done("big", 0.1)
        rec.stage("small")
        rec.stage_done("small", 0.1)
    finally:
        sampler.stop()
    big, small = rec.rows
    assert big["host_rss_peak_bytes"] - small["host_rss_peak_bytes"] > 300 << 20
    assert sampler.samples >= 3


def test_op_counter_counts_matmul_flops_and_bytes():
    a, b = torch.randn(64, 128), torch.randn(128, 32)
    counter = OpCounter([])
    rec = StageRecorder("cpu", _sampler(), counter=counter)
    with counter:
        rec.stage("mm")
        (a @ b).t().contiguous()
        rec.stage_done("mm", 0.01)
    rec.sampler.stop()
    (row,) = rec.rows
    assert row["flops"] == 2 * 64 * 128 * 32
    assert row["bytes_moved"] >= (64 * 128 + 128 * 32 + 2 * 64 * 32) * 4  # inputs, product, its contiguous copy


def _sampler():
    return MemorySampler(NvmlProbe(None))


def test_roofline_takes_the_slower_of_compute_and_memory():
    assert roofline(2e12, 1e9, tflops=100, gbs=1000) == pytest.approx(0.02)
    assert roofline(1e9, 4e9, tflops=100, gbs=1000) == pytest.approx(0.004)


# ---------------------------------------------------------------------------------------------
# the quality metrics (tools/metrics.py)


def _square(z=0.0, size=1.0):
    v = torch.tensor([[0, 0, z], [size, 0, z], [size, size, z], [0, size, z]], dtype=torch.float64)
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_rel_l2_and_rows_matched_by_coordinates():
    from pixal3d_rt.tools.metrics import match_rows, rel_l2, sparse_rel_l2

    x = torch.randn(50, 4)
    assert rel_l2(x, x) == 0.0 and rel_l2(1.01 * x, x) == pytest.approx(0.01, rel=1e-5)
    coords = torch.randint(0, 64, (400, 4)).unique(dim=0)
    feats = torch.randn(coords.shape[0], 3)
    perm = torch.randperm(coords.shape[0])
    ia, ib = match_rows(coords[perm], coords)
    assert torch.equal(coords[perm][ia], coords[ib]) and ia.numel() == coords.shape[0]
    same = sparse_rel_l2(coords[perm], feats[perm], coords, feats)  # order does not matter
    assert same["rel_l2"] == 0.0 and same["coord_iou"] == 1.0
    half = sparse_rel_l2(coords[perm][: coords.shape[0] // 2], 2 * feats[perm][: coords.shape[0] // 2], coords, feats)
    assert half["coord_iou"] == pytest.approx(0.5, abs=0.01) and half["rel_l2"] == pytest.approx(1.0)


def test_surface_samples_are_area_weighted_and_seeded():
    from pixal3d_rt.tools.metrics import sample_surface

    v = torch.tensor([[0, 0, 0], [3, 0, 0], [0, 1, 0], [0, 0, 5], [1, 0, 5], [0, 1, 5]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [3, 4, 5]])  # areas 1.5 and 0.5
    p = sample_surface(v, f, 20_000, seed=3)
    assert torch.equal(p, sample_surface(v, f, 20_000, seed=3)) and not torch.equal(p, sample_surface(v, f, 20_000, seed=4))
    share = float((p[:, 2] < 1).double().mean())
    assert share == pytest.approx(0.75, abs=0.02)
    low = p[p[:, 2] < 1]
    assert (low[:, 0] / 3 + low[:, 1] <= 1 + 1e-9).all()  # inside the triangle


def test_chamfer_and_fscore_of_a_shifted_surface():
    from pixal3d_rt.tools.metrics import _nearest_torch, mesh_distance, nearest_distances

    v, f = _square()
    same = mesh_distance(v, f, v, f, n=5_000)
    assert same["chamfer"] == 0.0 and same["f_score"] == 1.0
    near = mesh_distance(_square(z=0.005)[0], f, v, f, n=5_000)  # within tau: every point counts
    assert near["chamfer"] == pytest.approx(0.005, rel=0.01) and near["f_score"] == 1.0
    far = mesh_distance(_square(z=0.02)[0], f, v, f, n=5_000)  # beyond tau: none does
    assert far["chamfer"] == pytest.approx(0.02, rel=0.01) and far["f_score"] == 0.0
    a, b = torch.randn(3000, 3), torch.randn(2000, 3)
    assert torch.allclose(nearest_distances(a, b), _nearest_torch(a.double(), b.double()), atol=1e-12)


def test_quality_engines_path_with_a_cpu_package(tmp_path):
    """The `engines` quality path on an AOTInductor CPU package of the tiny SS flow (the one engine
    kind a CPU runs), built by `pixal3d-rt export` as a user builds it."""
    engines, out = tmp_path / "engines", tmp_path / "bench"
    built = subprocess.run(CLI + ["export", "--preset", "tiny", "--target", "aoti", "--device", "cpu", "--only", "ss_flow",
                                  "--precision", "fp32", "--out", str(engines)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-2000:]
    res = subprocess.run(CLI + ["bench", "--preset", "tiny", "--resolution", "512", "--runs", "1", "--glb-runs", "0", "--device", "cpu",
                                "--steps", "2", "--quality", "--quality-engines", str(engines), "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    q, paths = _quality(out)
    eng = paths["engines"]
    assert "error" not in eng and eng["engines"]["replaced"] == ["sparse_structure_flow_model"]
    assert eng["engines"]["target"] == "aoti" and eng["engines"]["networks"]["ss_flow"]["precision"] == "fp32"
    errors = {r["stage"]: r["rel_l2"] for r in eng["outputs"]}
    assert 0 < errors["ss_flow"] < 1e-4  # an fp32 package: rounding-level differences from the eager network
    assert all(e < 1e-4 for e in errors.values()) and eng["mesh"]["f_score"] == 1.0
    assert "engines" not in {u["path"] for u in q["unavailable"]}
    assert "| engines |" in (out / "bench.md").read_text()


def test_costs_from_bench_puts_measured_stage_bytes_beside_the_planned_ones(tmp_path):
    # a CUDA worker's rows (bytes above what was live at the stage's start) against runtime/stage_costs.py
    from pixal3d_rt.runtime.stage_costs import H200_COSTS

    part = {"resolution": 1024, "runs": [
        {"kind": "cold", "tokens": {"voxels": 1}, "stages": []},
        {"kind": "warm", "tokens": {"voxels": 4_000_000, "shape_hr_flow": 17_000}, "stages": [
            {"stage": "shape_decoder", "wall_s": 0.25, "torch_peak_allocated_bytes": 3_000_000_000,
             "torch_start_allocated_bytes": 1_000_000_000},
            {"stage": "preprocess", "wall_s": 0.01, "torch_peak_allocated_bytes": 7, "torch_start_allocated_bytes": 7}]}]}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"resolutions": [part]}))
    out = tmp_path / "costs.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "costs_from_bench.py"
    res = subprocess.run([sys.executable, str(script), str(bench), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = {r["stage"]: r for r in json.loads(out.read_text())["1024"]}
    dec = rows["shape_decoder"]
    assert dec["units"] == 4_000_000 and dec["bytes_per_unit"] == 500.0
    assert dec["predicted_transient_bytes"] == H200_COSTS["shape_decoder"].transient_per_unit * 4_000_000
    assert rows["preprocess"]["units"] is None and rows["preprocess"]["transient_bytes"] == 0
    assert "shape_decoder" in res.stdout
