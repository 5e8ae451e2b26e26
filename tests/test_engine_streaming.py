"""Engines under a memory plan, on the CPU: the TensorRT runner's per-stage device memory against a
stand-in for TensorRT's engine, context and runtime (the real ones need a GPU to deserialize),
following the TensorRT / TensorRT-RTX API it calls; and a budgeted pipeline run whose engines are
onnxruntime stand-ins, entered and left by the plan stage by stage, the plan's streaming budget
reaching the engine that streams."""
from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_dirs import ort_engine

from pixal3d_rt.runtime import specs as S
from pixal3d_rt.runtime.planner import GIB, RESIDENT, STAGE, STREAMED, NetworkSize, network_size
from pixal3d_rt.runtime.tensorrt_engine import EngineError, TensorRTEngine

SPEC = S.ExportSpec("f", "k", "sparse_flow", [S.TensorSpec("x", ("B", "N", 4))], [S.TensorSpec("y", ("B", "N", 4))],
                    [S.Profile("all", {"B": (1, 2, 2), "N": (1, 64, 1000)})])
TRT = SimpleNamespace(DataType=SimpleNamespace(FLOAT="f32"),
                      ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user"),
                      EngineStat=SimpleNamespace(TOTAL_WEIGHTS_SIZE="total"))
BLOB = b"serialized engine"
ACTIVATION_BYTES_PER_TOKEN = 10


class FakeContext:
    def __init__(self, log, budget):
        self.log, self.shapes, self.budget = log, {}, budget

    def set_optimization_profile_async(self, i, stream):
        pass

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape

    def set_tensor_address(self, name, ptr):
        pass

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def update_device_memory_size_for_shapes(self):
        return ACTIVATION_BYTES_PER_TOKEN * self.shapes["x"][1]

    def set_device_memory(self, ptr, size):
        self.log.append(("memory", size))

    def execute_async_v3(self, stream):
        self.log.append(("run", self.budget))
        return True

    def __del__(self):
        self.log.append(("context freed",))


class FakeConfig:
    def __init__(self, log):
        self.log = log

    def set_execution_context_allocation_strategy(self, strategy):
        self.strategy = strategy

    def create_runtime_cache(self):
        self.log.append(("runtime cache",))
        return object()

    def set_runtime_cache(self, cache):
        self.cache = cache


class FakeEngine:
    """ICudaEngine as the runner uses it: weights deferred (TensorRT-RTX) or loaded at
    deserialization, a weight streaming budget that TensorRT refuses to change while a context
    lives, contexts created from a runtime config."""

    num_io_tensors = 2

    def __init__(self, log, *, streamable=600, total=1000, deferred=True):
        self.log, self.streamable_weights_size, self.total = log, streamable, total
        self.weights_loaded = not deferred
        self._budget = -1  # TensorRT's own default: the runner always sets one
        self.contexts = weakref.WeakSet()

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_dtype(self, name):
        return TRT.DataType.FLOAT

    def get_engine_stat(self, stat):
        assert stat == TRT.EngineStat.TOTAL_WEIGHTS_SIZE
        return self.total

    @property
    def weight_streaming_budget_v2(self):
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, value):
        if len(self.contexts) == 0 and 0 <= value <= self.streamable_weights_size:
            self._budget = value
            self.log.append(("budget", value))

    def load_weights(self, blob):
        assert blob == BLOB and not self.weights_loaded
        self.weights_loaded = True
        self.log.append(("load weights",))
        return True

    def unload_weights(self):
        assert self.weights_loaded
        self.weights_loaded = False
        self.log.append(("unload weights",))
        return True

    def create_runtime_config(self):
        return FakeConfig(self.log)

    def create_execution_context(self, config):
        assert config.strategy == TRT.ExecutionContextAllocationStrategy.USER_MANAGED
        context = FakeContext(self.log, self._budget)
        self.contexts.add(context)
        self.log.append(("context", self._budget))
        return context


class FakeRuntime:
    """Runtime without deferred weights (full TensorRT): a deserialized engine holds its weights."""

    def __init__(self, log):
        self.log = log

    def deserialize_cuda_engine(self, blob):
        assert blob == BLOB
        self.log.append(("deserialize",))
        return FakeEngine(self.log, deferred=False)


ENTRY = {"weight_streaming": True, "weights": {"bytes": 1000, "unit_bytes": 100, "rest_bytes": 200, "units": 8}}


def runner(log, *, deferred=True, streamable=600, entry=ENTRY, engine_class=FakeEngine):
    engine = engine_class(log, streamable=streamable, deferred=deferred)
    return TensorRTEngine(Path("f.engine"), SPEC, TRT, engine, torch.device("cpu"), runtime=FakeRuntime(log), blob=BLOB,
                          deferred=deferred, entry=entry)


def run(eng, n):
    return eng.run({"x": torch.randn(1, n, 4)})


def test_stage_takes_and_gives_back_weights_and_context():
    """Placed `stage`: weights loaded and a context created when the stage starts, its working
    memory sized for the shapes at the run, all of it given back when the stage ends."""
    log = []
    eng = runner(log)
    assert eng.context is None and not eng.engine.weights_loaded  # nothing on the device after loading
    with eng.placed(STAGE):
        assert log == [("budget", 600), ("load weights",), ("runtime cache",), ("context", 600)]  # all weights on the device
        run(eng, 50)
        run(eng, 30)
        assert eng.activations.numel() == 500  # sized for 50 tokens, kept for the smaller call
    assert log[4:] == [("memory", 500), ("run", 600), ("memory", 500), ("run", 600), ("context freed",), ("unload weights",)]
    assert eng.context is None and eng.activations is None and not eng.engine.weights_loaded


def test_streamed_budget_is_set_before_the_context_and_changes_recreate_it():
    """Placed `streamed` with the plan's bytes for the weights: TensorRT's budget is those bytes less
    the weights it never streams (total 1000 - streamable 600), set while no context lives."""
    log = []
    eng = runner(log)
    with eng.placed(STREAMED, 700):
        run(eng, 20)
    assert log == [("budget", 300), ("load weights",), ("runtime cache",), ("context", 300), ("memory", 200), ("run", 300),
                   ("context freed",), ("unload weights",)]
    log.clear()
    with eng.placed(RESIDENT):  # resident: everything on the device, and kept after the stage
        run(eng, 20)
    assert log == [("budget", 600), ("load weights",), ("context", 600), ("memory", 200), ("run", 600)]
    assert eng.context is not None and eng.engine.weights_loaded and eng.activations is None
    log.clear()
    with eng.placed(STREAMED, 500):  # a new budget: the live context goes first (TensorRT refuses otherwise)
        run(eng, 20)
    assert log[:3] == [("context freed",), ("budget", 100), ("context", 100)]
    assert ("load weights",) not in log  # still loaded from the resident stage
    # the budget stays inside what TensorRT accepts
    assert eng.set_streaming_budget(50) == 0 and eng.set_streaming_budget(10**9) == 600
    assert eng.set_streaming_budget(None) == 600


def test_without_deferred_weights_the_engine_is_released_and_deserialized_again():
    """Full TensorRT (no deferred weights): a `stage` engine's weights leave with the engine itself,
    deserialized again from the mapped file at its next stage."""
    log = []
    eng = runner(log, deferred=False)
    first = eng.engine
    with eng.placed(STAGE):
        run(eng, 10)
    assert eng.engine is None and ("context freed",) in log
    log.clear()
    with eng.placed(STREAMED, 800):
        assert eng.engine is not first
        run(eng, 10)
    assert log[:3] == [("deserialize",), ("budget", 400), ("context", 400)]
    assert eng.engine is None


def test_engine_without_weight_streaming_keeps_every_weight():
    log = []
    eng = runner(log, streamable=0, entry={})
    assert eng.set_streaming_budget(100) is None
    with eng.placed(STREAMED, 100):
        run(eng, 10)
    assert not [e for e in log if e[0] == "budget"] and ("context", -1) in log


def test_outside_a_plan_the_first_run_takes_everything_and_keeps_it():
    log = []
    eng = runner(log)
    run(eng, 10)
    context = eng.context
    run(eng, 10)
    assert eng.context is context and eng.engine.weights_loaded
    assert [e for e in log if e[0] in ("context", "load weights")] == [("load weights",), ("context", 600)]


class RefusingEngine(FakeEngine):
    @property
    def weight_streaming_budget_v2(self):
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, value):
        pass


def test_refused_budget_is_an_engine_error():
    eng = runner([], engine_class=RefusingEngine)
    with pytest.raises(EngineError, match="did not accept a weight streaming budget of 300 bytes"):
        eng.set_streaming_budget(700)


def test_aoti_package_is_loaded_per_stage(monkeypatch):
    """An AOTInductor package holds its weights: a `stage` one is loaded when its stage starts and
    dropped when it ends; a `resident` one stays; outside a plan the first run loads it."""
    from pixal3d_rt.runtime.aoti_engine import AOTIEngine

    loads = []

    def load_package(path, device_index):
        loads.append((path, device_index))
        return lambda x: x * 2

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load_package)
    spec = S.ExportSpec("f", "k", "ss_decoder", [S.TensorSpec("x", (1, 4))], [S.TensorSpec("y", (1, 4))], [])
    eng = AOTIEngine(Path("f.pt2"), spec, lambda x: x * 2, torch.device("cpu"))
    with eng.placed(STAGE):
        assert eng.run({"x": torch.ones(1, 4)})["y"].sum() == 8
    assert eng.runner is None and loads == []
    with eng.placed(RESIDENT):
        assert loads == [("f.pt2", -1)]
        eng.run({"x": torch.ones(1, 4)})
    assert eng.runner is not None
    with eng.placed(STAGE):
        pass
    eng.run({"x": torch.ones(1, 4)})
    assert len(loads) == 2 and eng.runner is not None


@pytest.mark.parametrize("field,value,problem", [
    ("weight_streaming", "yes", "no valid 'weight_streaming'"),
    ("weights", {"bytes": 10}, "no valid 'weights'"),
    ("weights", dict(ENTRY["weights"], units=-1), "no valid 'weights'"),
    ("weights", dict(ENTRY["weights"], units=True), "no valid 'weights'")])
def test_manifest_records_of_streaming_are_checked(field, value, problem):
    from pixal3d_rt.runtime.tensorrt_engine import manifest_problem

    entry = {"file": "f.engine", "bytes": 1, "sha256": "0" * 64, "spec": SPEC.to_json(), **ENTRY}
    assert manifest_problem({"networks": {"f": entry}}) is None
    assert problem in manifest_problem({"networks": {"f": dict(entry, **{field: value})}})


def test_engine_modules_give_the_planner_their_recorded_sizes():
    from pixal3d_rt.runtime.engine import stage_module

    spec = S.ExportSpec("ss_decoder", "sparse_structure_decoder", "ss_decoder", [S.TensorSpec("latent", (1, 8, 4, 4, 4))],
                        [S.TensorSpec("logits", (1, 1, 16, 16, 16))], [])
    streams = stage_module(ort_engine(spec, Path("unused.onnx"), entry=ENTRY))
    assert network_size(streams) == NetworkSize(**ENTRY["weights"])
    # an engine that cannot stream offers no units: the planner never plans it streamed
    whole = stage_module(ort_engine(spec, Path("unused.onnx"), entry=dict(ENTRY, weight_streaming=False)))
    assert network_size(whole) == NetworkSize(1000)
    assert network_size(stage_module(ort_engine(spec, Path("unused.onnx")))) == NetworkSize(0)


# ---------------------------------------------------------------------------------------------
# a budgeted pipeline run with engines


IMAGE_SEED, STEPS = 5, 2
# the SS flow's sizes as recorded in the stand-in directory: larger than any tiny network and in 8
# blocks, so that the budget below streams it (the tiny flows' 2 blocks could never stream)
FLOW_WEIGHTS = {"bytes": 2_000_000, "unit_bytes": 200_000, "rest_bytes": 400_000, "units": 8}
BUDGET_BYTES = 950_000  # the largest tiny network whole (the shape decoder, 0.92 MB), not the flow


@pytest.fixture(scope="module")
def stand_in_dir(tmp_path_factory):
    """An engine directory of onnxruntime stand-ins: the SS flow (recorded as streaming) and the SS
    decoder, fp32 ONNX of the tiny preset, with a manifest as the exporter writes it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from pixal3d_rt.export.onnx_export import export_onnx
    from pixal3d_rt.export.trt_build import Source
    from pixal3d_rt.files import sha256_file

    tiny = Source.from_preset("tiny")
    d = tmp_path_factory.mktemp("stand-in-engines")
    nets = {}
    for spec in S.build_specs(tiny.configs, tiny.dino_config, tiny.geometry, only=["ss_flow", "ss_decoder"]):
        net = tiny.load(spec, "fp32")
        path = d / f"{spec.name}.onnx"
        export_onnx(spec, net, path)
        streams = spec.name == "ss_flow"
        nets[spec.name] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                           "spec": spec.to_json(), "target": "tensorrt-rtx", "weight_streaming": streams,
                           "weights": FLOW_WEIGHTS if streams else dataclasses.asdict(network_size(net))}
    (d / "manifest.json").write_text(json.dumps({"format": 1, "target": "tensorrt-rtx", "networks": nets}))
    return d


def stage_events(log):
    """A progress that writes stage starts and ends into the engines' log."""
    from pixal3d_rt.progress import Progress

    class StageEvents(Progress):
        def stage(self, name, detail=""):
            log.append(("stage", name))

        def stage_done(self, name, seconds, detail=""):
            log.append(("done", name))

    return StageEvents()


def _with_stand_ins(pipe, d, monkeypatch, log):
    from pixal3d_rt.runtime.tensorrt_engine import read_manifest, use_engines

    nets = read_manifest(d)["networks"]
    monkeypatch.setattr(TensorRTEngine, "load", classmethod(lambda cls, dd, name, device=None: ort_engine(
        S.ExportSpec.from_json(nets[name]["spec"]), Path(dd) / nets[name]["file"], nets[name], log)))
    return use_engines(pipe, d)


def test_budgeted_run_places_engines_per_stage(stand_in_dir, monkeypatch):
    from pixal3d_rt import Pipeline
    from pixal3d_rt.pipeline import calibration_image

    image = calibration_image()
    log = []
    plain = Pipeline.from_preset("tiny", device="cpu")
    _with_stand_ins(plain, stand_in_dir, monkeypatch, log)
    ref = plain.run(image, 512, seed=IMAGE_SEED, steps=STEPS)
    assert plain.stage_engines[("ss_flow", "sparse_structure_flow_model")].sess is not None  # no plan: kept

    log.clear()
    pipe = Pipeline.from_preset("tiny", device="cpu", vram_budget=BUDGET_BYTES / GIB)
    assert set(_with_stand_ins(pipe, stand_in_dir, monkeypatch, log)) == {"sparse_structure_flow_model",
                                                                           "sparse_structure_decoder"}
    assert set(pipe.stage_engines) == {("ss_flow", "sparse_structure_flow_model"), ("ss_decoder", "sparse_structure_decoder")}
    assert sorted(log) == [("leave", "ss_decoder", False), ("leave", "ss_flow", False)]  # nothing held until their stages
    log.clear()
    r = pipe.run(image, 512, seed=IMAGE_SEED, steps=STEPS, progress=stage_events(log))

    flow = r.plan["ss_flow"]
    assert flow.weights == {"sparse_structure_flow_model": STREAMED}
    budget = flow.weight_bytes["sparse_structure_flow_model"]
    assert budget == FLOW_WEIGHTS["rest_bytes"] + 2 * FLOW_WEIGHTS["unit_bytes"]
    dec = r.plan["ss_decoder"].weights["sparse_structure_decoder"]
    for stage, weight_bytes, keep in (("ss_flow", budget, False), ("ss_decoder", None, dec == RESIDENT)):
        i = log.index(("stage", stage))
        j = log.index(("done", stage))
        inside = log[i + 1:j]
        assert inside[0] == ("enter", stage, weight_bytes) and inside[-1] == ("leave", stage, keep), inside
        assert inside[1:-1] and all(e == ("run", stage) for e in inside[1:-1]), inside
        assert sum(e[0] == "enter" for e in log if e[1] == stage) == 1  # entered in its stage only
    assert pipe.stage_engines[("ss_flow", "sparse_structure_flow_model")].sess is None  # released after its stage
    assert pipe.stage_engines[("ss_flow", "sparse_structure_flow_model")].weight_bytes == budget
    # placing engines moves no values: the same latents and mesh as the unbudgeted run
    assert torch.equal(r.latents["shape_slat"].feats, ref.latents["shape_slat"].feats)
    assert torch.equal(r.vertices, ref.vertices) and torch.equal(r.faces, ref.faces)
