"""The memory planner and the plan the pipeline executes, on the CPU with the tiny preset: its stage
costs measured (LiveBytes), budgets scaled down so that the planner's decisions change, every
budgeted run compared with the unbudgeted one and its measured peaks with the predicted ones."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixal3d_rt import Pipeline
from pixal3d_rt.errors import BudgetError
from pixal3d_rt.pipeline import calibration_image
from pixal3d_rt.runtime.memory import LiveBytes, StagePeak
from pixal3d_rt.runtime.planner import GIB, RESIDENT, STAGE, STREAMED, PlanError
from pixal3d_rt.runtime.stages import RUN_STAGES, stages_for

RES, STEPS = 1024, 2
IMAGE = calibration_image()


@pytest.fixture(scope="module")
def tiny():
    pipe = Pipeline.from_preset("tiny", device="cpu")
    pipe.calibrate(IMAGE, RES, steps=STEPS)
    plain = pipe.run(IMAGE, RES, steps=STEPS)
    return pipe, plain


def _budgets(pipe):
    """Budgets (GiB) at which the planner's decisions differ: everything resident, some networks
    per stage, some streamed; and the smallest that fits."""
    model = pipe.memory_model()
    roomy = model.plan(64 * GIB, RES).peak
    try:
        model.plan(1, RES)
    except PlanError as e:
        floor = e.needed
    return roomy, floor


def test_timings_and_tokens_use_the_stage_names(tiny):
    pipe, plain = tiny
    assert [row[0] for row in plain.timings] == [s.name for s in stages_for(RES)]
    assert set(r[0] for r in plain.timings) <= set(RUN_STAGES)
    flows = [s.name for s in stages_for(RES) if s.sampled]
    assert all(plain.tokens[name] > 0 for name in flows)
    assert plain.tokens["shape_latent"] == plain.tokens["shape_hr_flow"] and plain.tokens["voxels"] > 0


def test_calibration_measures_every_stage(tiny):
    pipe, _ = tiny
    costs = pipe.stage_costs
    assert set(costs) == {s.name for s in stages_for(RES)}
    for name in ("ss_flow", "shape_hr_flow", "shape_decoder", "tex_decoder"):
        c = costs[name]
        assert c.measured and c.transient_fixed + c.transient_per_unit * c.measured_at > 0, name
        assert c.seconds_per_unit > 0, name


def _weights_bound(pipe):
    """The tiny preset's model with the stages that hold no weights made free, so that the networks'
    weights (not the mesh extraction's arrays) decide what fits: every placement gets used."""
    from dataclasses import replace

    model = pipe.memory_model()
    for st in stages_for(RES):
        if not st.networks or st.networks == ("naf",):
            model.costs[st.name] = replace(model.costs[st.name], transient_fixed=0, transient_per_unit=0)
    return model


def test_decisions_change_as_the_budget_shrinks(tiny):
    pipe, _ = tiny
    model = _weights_bound(pipe)
    roomy = model.plan(64 * GIB, RES).peak
    with pytest.raises(PlanError) as e:
        model.plan(1, RES)
    floor = e.value.needed
    assert floor < roomy
    ample = model.plan(int(roomy * 1.01), RES)
    assert ample.all_resident and ample.peak <= roomy * 1.01
    modes = {}
    for frac in (0.9, 0.7, 0.5, 0.3, 0.0):
        budget = int(floor + (roomy - floor) * frac)
        plan = model.plan(budget, RES)
        assert plan.peak <= budget
        for sp in plan.stages:
            for mode in sp.weights.values():
                modes.setdefault(mode, budget)
    # the planner leaves "everything resident" for per-stage loading (a tiny network of two blocks
    # saves nothing by streaming: two units are all of it; full size streams, below)
    assert {RESIDENT, STAGE} <= set(modes)
    with pytest.raises(PlanError) as e:
        model.plan(floor - 1, RES)
    assert e.value.needed == floor


def _run_measured(pipe, budget_gib):
    tracker = LiveBytes()
    pipe.probe = StagePeak("cpu", tracker)
    try:
        with tracker:
            r = pipe.run(IMAGE, RES, steps=STEPS, vram_budget=budget_gib)
        # resident networks already where they compute were never copied, so the counter never saw them
        sizes = pipe.memory_model().networks
        in_place = sum(sizes[n].bytes for n in r.plan.resident if n not in pipe._placements)
        return r, in_place
    finally:
        pipe.probe = None
        pipe._release_placements(everything=True)


@pytest.mark.parametrize("where", [0.5, 0.0, "streamed"])
def test_budgeted_run_matches_and_stays_near_its_prediction(tiny, where, monkeypatch):
    pipe, plain = tiny
    roomy, floor = _budgets(pipe)
    budget = (floor + (roomy - floor) * (0.0 if where == "streamed" else where)) / GIB
    if where == "streamed":  # every network that can stream does, so the run exercises streaming
        planned = type(pipe).plan

        def streaming(self, *a, **k):
            plan = planned(self, *a, **k)
            model = self.memory_model()
            for sp in plan.stages:
                for net in sp.weights:
                    if model.networks[net].units and net not in plan.resident and sp.stage not in (k.get("fixed") or {}):
                        sp.weights[net] = STREAMED
                sp.predicted_peak = model.peak(sp, set(plan.resident))
            return plan

        monkeypatch.setattr(type(pipe), "plan", streaming)
    r, in_place = _run_measured(pipe, budget)
    assert r.plan is not None and not r.plan.all_resident
    if where == "streamed":
        assert any(m == STREAMED for sp in r.plan.stages for m in sp.weights.values())
    # placements and chunking move bytes, never values: the same latents and mesh as resident
    for key in ("shape_slat", "tex_slat"):
        assert torch.equal(r.latents[key].feats, plain.latents[key].feats), key
    assert torch.equal(r.vertices, plain.vertices) and torch.equal(r.faces, plain.faces)
    assert torch.equal(r.voxel_attrs, plain.voxel_attrs)
    measured = {p["stage"]: p["peak"] for p in r.stage_peaks}
    for sp in r.plan.stages:
        m, p = measured[sp.stage] + in_place, sp.predicted_peak - r.plan.overhead
        assert m <= budget * GIB, (sp.stage, m, budget)
        # within 10 % above (the allocator slack covers most of it) and never far below
        assert 0.6 * p <= m <= 1.10 * p, (sp.stage, m, p)


def test_out_of_memory_in_a_stage_plans_it_again(tiny, monkeypatch):
    pipe, plain = tiny
    real = type(pipe)._stage_shape_hr_flow
    calls = []

    def flaky(self, v, sp, progress):
        calls.append(sp)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, v, sp, progress)

    monkeypatch.setattr(type(pipe), "_stage_shape_hr_flow", flaky)
    lines = []
    roomy, _ = _budgets(pipe)
    r = pipe.run(IMAGE, RES, steps=STEPS, vram_budget=2 * roomy / GIB, progress=lines.append)
    assert len(calls) == 2 and any("planning it again" in line and "retry 1 of 2" in line for line in lines)
    assert r.plan.budget < 2 * roomy  # the retry planned inside a tighter budget
    assert torch.equal(r.latents["tex_slat"].feats, plain.latents["tex_slat"].feats)


def test_out_of_memory_every_time_gives_up_after_two_retries(tiny, monkeypatch):
    pipe, _ = tiny
    calls = []

    def broke(self, v, sp, progress):
        calls.append(sp)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(pipe), "_stage_tex_flow", broke)
    roomy, _ = _budgets(pipe)
    with pytest.raises(BudgetError, match="tex_flow: out of GPU memory"):
        pipe.run(IMAGE, RES, steps=STEPS, vram_budget=3 * roomy / GIB)
    assert len(calls) == 3
    # when the tighter budget fits no plan, the one line says both
    calls.clear()
    with pytest.raises(BudgetError, match="tex_flow: out of GPU memory.*under a tighter budget no plan fits"):
        pipe.run(IMAGE, RES, steps=STEPS, vram_budget=roomy / GIB)


def test_budget_below_every_plan_names_the_smallest(tiny):
    pipe, _ = tiny
    _, floor = _budgets(pipe)
    with pytest.raises(BudgetError, match=r"smallest budget that fits is \d+\.\d GiB"):
        pipe.run(IMAGE, RES, steps=STEPS, vram_budget=floor * 0.5 / GIB)


def test_full_size_plans_on_this_machine():
    """The official networks' sizes (meta device) with the H200 stage costs: 6 GiB streams or
    stages the flows, 24 GiB keeps everything resident, 1 GiB fits nothing."""
    from pixal3d_rt.pipeline import plan_offline

    roomy = plan_offline("reference", 1024, 48, overhead_gib=0.5)
    assert roomy.all_resident
    tight = plan_offline("reference", 1024, 6, overhead_gib=0.5)
    assert tight.peak <= 6 * GIB and not tight.all_resident
    assert tight["shape_hr_flow"].weights["shape_slat_flow_model_1024"] != RESIDENT
    streamed = plan_offline("reference", 512, 3, overhead_gib=0.5)
    assert streamed.peak <= 3 * GIB
    assert any(m == STREAMED for sp in streamed.stages for m in sp.weights.values())
    with pytest.raises(BudgetError, match="smallest budget"):
        plan_offline("reference", 1024, 1, overhead_gib=0.5)
    # what does not fit even streamed and chunked is named: the 1536 flows' weights and work in 2 GiB
    with pytest.raises(BudgetError, match="stage \\w+ .* smallest budget that fits is"):
        plan_offline("reference", 1536, 2, overhead_gib=0.5)


def test_streamed_flows_keep_the_units_the_budget_has_room_for():
    """A streamed flow keeps its first blocks on the device while they fit: counted in the predicted
    peak (inside the budget, one more block would not fit) and in the weights' bytes; a stage bound by
    its copies gets shorter."""
    from dataclasses import replace

    from pixal3d_rt.pipeline import memory_model_for
    from pixal3d_rt.reference_preset import build_reference
    from pixal3d_rt.runtime.stage_costs import H200_COSTS

    w, _ = build_reference("meta")
    model = memory_model_for(w, H200_COSTS, "cuda", int(0.9 * GIB))
    plan = model.plan(3 * GIB, 512)
    streamed = [sp for sp in plan.stages if STREAMED in sp.weights.values()]
    assert streamed and plan.peak <= 3 * GIB
    for sp in streamed:
        (net,) = [n for n, m in sp.weights.items() if m == STREAMED]
        size = model.networks[net]
        assert 0 < sp.resident_units < size.units
        assert sp.weight_bytes[net] == size.rest_bytes + (sp.resident_units + 2) * size.unit_bytes
        resident = set(plan.resident)
        assert model.peak(sp, resident) == sp.predicted_peak <= 3 * GIB
        assert model.peak(replace(sp, resident_units=sp.resident_units + 1), resident) > 3 * GIB
        assert f"{sp.resident_units} blocks kept" in sp.knobs()
    # where the copies bound the stage, fewer of them make it shorter (compute-bound ones stay about the same)
    faster = [model.seconds(sp) < 0.9 * model.seconds(replace(sp, resident_units=0)) for sp in streamed]
    assert any(faster)


def test_a_cost_measured_at_a_resolution_serves_plans_at_it():
    """"stage@R" entries (the decoders' bytes per voxel differ by resolution) win over the stage's own
    entry in plans at R, and the decoded count predicted at R is the one measured there."""
    from pixal3d_rt.pipeline import memory_model_for
    from pixal3d_rt.reference_preset import build_reference
    from pixal3d_rt.runtime.stage_costs import H200_COSTS

    w, _ = build_reference("meta")
    model = memory_model_for(w, H200_COSTS, "cuda", int(0.8 * GIB))
    per_voxel = {}
    for r in (512, 1024, 1536):
        plan = model.plan(24 * GIB, r)
        sp = plan["shape_decoder"]
        assert model.cost("shape_decoder") is H200_COSTS[f"shape_decoder@{r}"]
        assert sp.units == H200_COSTS[f"shape_decoder@{r}"].measured_at
        per_voxel[r] = model.transient(sp) / sp.units
        assert per_voxel[r] == pytest.approx(H200_COSTS[f"shape_decoder@{r}"].transient_per_unit, rel=0.01)
    del model.costs["shape_decoder@1536"]  # unmeasured there: the generic entry, its count scaled with the grid
    plan = model.plan(24 * GIB, 1536)
    assert plan["shape_decoder"].units == int(H200_COSTS["shape_decoder"].measured_at * 1.5 ** 2)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pixal3d_rt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def test_plan_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    p = _cli("plan", "--vram-budget", "6", "--resolution", "1024", "--json", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for stage in stages_for(1024):
        assert stage.name in p.stdout
    assert "predicted peak" in p.stdout and "streamed" in p.stdout or "stage" in p.stdout
    plan = json.loads(out.read_text())
    assert plan["budget_bytes"] == 6 * GIB and plan["predicted_peak_bytes"] <= 6 * GIB
    bad = _cli("plan", "--vram-budget", "1", "--resolution", "1024", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "smallest budget" in bad.stderr


def test_infer_under_a_budget_in_a_fresh_process(tmp_path, tiny):
    pipe, _ = tiny
    roomy, floor = _budgets(pipe)
    img = tmp_path / "disc.png"
    from PIL import Image

    Image.fromarray(IMAGE, "RGBA").save(img)
    out = tmp_path / "disc.glb"
    budget = f"{(floor + (roomy - floor) * 0.3) / GIB:.4f}"
    p = _cli("infer", "--preset", "tiny", "--image", str(img), "--output", str(out), "--device", "cpu", "--steps", "2",
             "--vram-budget", budget, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size > 0 and "plan:" in p.stderr and "stage" in p.stderr
    small = tmp_path / "small.glb"
    p = _cli("infer", "--preset", "tiny", "--image", str(img), "--output", str(small), "--device", "cpu",
             "--vram-budget", "0.01", cwd=tmp_path)
    assert p.returncode == 2 and "smallest budget" in p.stderr and not small.exists()
    assert not list(tmp_path.glob("small*"))


def test_host_store_reads_networks_per_stage_under_a_host_budget(tmp_path, tiny):
    """Weights in the official layout, read per stage from their files into a host store smaller than
    the networks: the store drops the least recently used and re-reads it; the run is unchanged."""
    from pixal3d_rt.checkpoints import write_weights

    pipe, _ = tiny
    d = write_weights(pipe.w, tmp_path / "weights")
    ref = Pipeline.from_pretrained(d, device="cpu", resolution=512).run(IMAGE, 512, steps=1)
    budget = 1.2e6  # bytes: about one tiny network at a time
    stored = Pipeline.from_pretrained(d, device="cpu", resolution=512, vram_budget="auto", host_budget=budget / GIB)
    store = stored.host_store
    assert store is not None and store.held_bytes() == 0  # checked, not read
    r = stored.run(IMAGE, 512, steps=1)
    assert torch.equal(r.latents["shape_slat"].feats, ref.latents["shape_slat"].feats)
    assert torch.equal(r.vertices, ref.vertices) and torch.equal(r.faces, ref.faces)
    assert store.held_bytes() <= budget
    assert any(not w.host_loaded for w in store.networks.values())  # dropped again after their stage


@pytest.mark.skipif(not torch.cuda.is_available(), reason="caps torch's CUDA allocator")
def test_a_budgeted_run_caps_the_allocator_inside_the_budget():
    """The allocator's cache of freed blocks would grow past a budget on a larger card: a budgeted
    run caps it at the budget less the non-torch overhead, and gives the cap back after."""
    from pixal3d_rt.pipeline import KERNEL_IMAGES_BYTES
    from pixal3d_rt.progress import Progress

    pipe = Pipeline.from_preset("tiny", device="cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    budget = 2.0
    seen = []

    class Caps(Progress):
        def stage(self, name, detail=""):
            seen.append(torch.cuda.get_per_process_memory_fraction() * total)

    before = torch.cuda.get_per_process_memory_fraction()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pipe.run(IMAGE, RES, steps=STEPS, vram_budget=budget, progress=Caps())
    assert len(seen) >= 10
    assert max(seen) <= budget * GIB - KERNEL_IMAGES_BYTES  # the overhead is at least the kernels' images
    assert torch.cuda.max_memory_reserved() <= budget * GIB
    assert torch.cuda.get_per_process_memory_fraction() == before
    pipe.run(IMAGE, RES, steps=STEPS, progress=Caps())  # unbudgeted: no cap
    assert seen[-1] == before * total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's CUDA allocator")
@pytest.mark.parametrize("switched_on", [False, True])
def test_expandable_segments_in_a_budgeted_run_when_switched_on(monkeypatch, switched_on):
    """Fixed segments ran a decoder out of memory under the cap with half of them free between live
    blocks: with the switch a budgeted run's new segments are expandable, later ones fixed again."""
    from pixal3d_rt.pipeline import EXPANDABLE_SEGMENTS_ENV
    from pixal3d_rt.progress import Progress

    monkeypatch.setenv(EXPANDABLE_SEGMENTS_ENV, "1" if switched_on else "0")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    pipe = Pipeline.from_preset("tiny", device="cuda")
    kinds = []

    class Segments(Progress):
        def stage(self, name, detail=""):
            kinds.extend(seg.get("is_expandable", False) for seg in torch.cuda.memory_snapshot())

    torch.cuda.empty_cache()
    pipe.run(IMAGE, RES, steps=STEPS, vram_budget=2.0, progress=Segments())
    assert kinds and any(kinds) == switched_on
    torch.cuda.empty_cache()
    after = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")  # a new segment, made after the run
    fixed = [seg for seg in torch.cuda.memory_snapshot() if seg["address"] <= after.data_ptr() < seg["address"] + seg["total_size"]]
    assert fixed and not fixed[0].get("is_expandable", False)


def test_the_cache_is_in_the_way_when_the_stage_would_not_fit_beside_it():
    from pixal3d_rt.pipeline import cache_in_the_way

    gb = 10**9
    # the 8 GiB 1024 run's shape decoder: 7.72 GB reserved, 4.2 allocated, a 4.3 GB stage under a 7.78 GB cap
    assert cache_in_the_way(int(7.72 * gb), int(4.2 * gb), int(4.3 * gb), int(7.78 * gb))
    assert not cache_in_the_way(int(2.0 * gb), int(0.4 * gb), int(3.3 * gb), int(5.63 * gb))  # room beside it
    assert not cache_in_the_way(int(5.0 * gb), int(3.0 * gb), int(2.0 * gb), int(5.63 * gb))  # the stage needs nothing new
    assert cache_in_the_way(int(5.0 * gb), int(3.0 * gb), int(3.7 * gb), int(5.63 * gb))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's CUDA allocator")
def test_the_cache_is_emptied_before_a_stage_that_would_run_into_the_cap():
    from types import SimpleNamespace

    from pixal3d_rt.pipeline import _make_room

    torch.cuda.empty_cache()
    held = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    del held  # 64 MiB cached, free
    reserved = torch.cuda.memory_reserved()
    cap = reserved + (100 << 20)
    _make_room("cuda", cap, SimpleNamespace(predicted_peak=torch.cuda.memory_allocated() + (90 << 20)), 0)
    assert torch.cuda.memory_reserved() == reserved  # room enough beside the cache: kept
    _make_room("cuda", cap, SimpleNamespace(predicted_peak=torch.cuda.memory_allocated() + (120 << 20)), 0)
    assert torch.cuda.memory_reserved() <= reserved - (64 << 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend needs a CUDA GPU")
def test_host_store_serves_the_cuda_backend_flows(tmp_path, tiny):
    """The cuda backend makes its own device copies of a flow from the host copy: under a host store
    that drops networks after their stage, each flow stage has it read back first; same result."""
    from pixal3d_rt.checkpoints import write_weights

    pipe, _ = tiny
    d = write_weights(pipe.w, tmp_path / "weights")
    ref = Pipeline.from_pretrained(d, device="cuda", resolution=512, backend="cuda").run(IMAGE, 512, steps=1)
    budget = 0.5e6  # bytes: less than any tiny network, so each is read for its stage and dropped after it
    stored = Pipeline.from_pretrained(d, device="cuda", resolution=512, backend="cuda", vram_budget=8,
                                      host_budget=budget / GIB)
    flow = stored.host_store.networks["shape_slat_flow_model_512"]
    reads = []
    read = flow.reader
    flow.reader = lambda module: (reads.append(1), read(module))
    for n in (1, 2):  # the second image finds the flow dropped again and reads it back
        r = stored.run(IMAGE, 512, steps=1)
        assert torch.equal(r.latents["shape_slat"].feats, ref.latents["shape_slat"].feats)
        assert torch.equal(r.vertices, ref.vertices) and torch.equal(r.faces, ref.faces)
        assert not flow.host_loaded and stored.host_store.held_bytes() <= budget
        assert len(reads) == n


def test_offload_then_a_budgeted_run(tiny):
    """A pipeline whose networks were loaded where they compute moves them all to host copies; a
    budgeted run then places them per stage and gives the same asset."""
    pipe, plain = tiny
    roomy, floor = _budgets(pipe)
    pipe.offload()
    assert set(pipe._placements) >= {"dinov3", "naf", "shape_slat_flow_model_1024", "tex_slat_decoder"}
    assert all(not nw.resident for nw in pipe._placements.values())
    try:
        r = pipe.run(IMAGE, RES, steps=STEPS, vram_budget=(floor + roomy) / 2 / GIB)
    finally:
        pipe._release_placements(everything=True)
    assert torch.equal(r.latents["tex_slat"].feats, plain.latents["tex_slat"].feats)
    assert torch.equal(r.faces, plain.faces)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_infer_with_weights_and_a_host_budget_in_a_fresh_process(tmp_path, tiny, device):
    """`infer --weights W --vram-budget B --host-budget GB`: the networks read per stage from the
    official-layout files into a host store smaller than they are; the same GLB as a plain run (on
    CUDA a numeric budget loads every network to the host first: the device holds only what a stage needs)."""
    import trimesh
    from PIL import Image

    from pixal3d_rt.checkpoints import write_weights

    pipe, _ = tiny
    w = write_weights(pipe.w, tmp_path / "weights")
    img = tmp_path / "disc.png"
    Image.fromarray(IMAGE).save(img)
    common = ["--weights", str(w), "--image", str(img), "--device", device, "--resolution", "512", "--steps", "1"]
    plain, stored = tmp_path / "plain.glb", tmp_path / "stored.glb"
    p = _cli("infer", *common, "--output", str(plain), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    budget = "auto" if device == "cpu" else "2"
    p = _cli("infer", *common, "--output", str(stored), "--vram-budget", budget, "--host-budget", "0.0012", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    if device == "cpu":
        assert stored.read_bytes() == plain.read_bytes()
    else:  # the same kernels, placed per stage
        a, b = (trimesh.load(str(f), force="mesh") for f in (plain, stored))
        assert a.faces.shape == b.faces.shape and abs(a.vertices - b.vertices).max() < 1e-3
    p = _cli("infer", *common, "--output", str(tmp_path / "x.glb"), "--host-budget", "1", cwd=tmp_path)
    assert p.returncode == 2 and "--host-budget needs --vram-budget" in p.stderr
