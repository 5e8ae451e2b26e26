"""`pixal3d-rt bench --quality`: how far each fast path's outputs are from the fp32 eager path's.

The reference is the eager backend with every network in fp32 (TF32 off), run on the same preset,
image and seed as the fast paths. Each path runs the whole pipeline once, and its stage outputs are
taken as they pass (`StageOutputs`: the sampler's calls, DINOv3's encodings, forward hooks on the
decoders; the pipeline is not modified): DINOv3 tokens, each stage's projected conditioning and
sampled latent, the sparse-structure logits, the decoded shape voxels, the PBR voxel attributes,
and the decoded mesh. Per output: relative L2 error against the reference (sparse outputs over the
voxels both runs hold, with the share they hold in common as coord_iou); for the mesh: Chamfer
distance and F-score@0.01 (tools/metrics.py).

Paths (those this run can take; the others are listed with the reason):
  fp32_eager_repeat  the reference again: the comparison's floor (0 where the run is deterministic)
  bf16_eager         eager, flows in bf16 and decoders in fp16 (upstream's precisions)
  fp8_simulated      bf16_eager with the flows' block Linears quantized to FP8 E4M3 as the fp8
                     engines compute them (calibrated as `pixal3d-rt export --precision fp8` does),
                     simulated in torch: the numerics of fp8 engines, not an engine
  cuda               the cuda backend (CUDA devices): what `pixal3d-rt infer` runs on a GPU
  engines            the networks of `--engines DIR` in place of the eager ones, as `infer --engines`
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import importlib
import time

import torch

from .tools.metrics import DEFAULT_POINTS, DEFAULT_TAU, chamfer_fscore, match_rows, rel_l2, sample_surface, sparse_rel_l2

# upstream's torso precisions (the official configs): what the networks run in on a GPU
FLOW_TORSO = torch.bfloat16
DECODER_TORSO = torch.float16
MESH_SEED = 0
# pipeline key of a flow -> (stage that computes its conditioning, stage of its sampling, short name)
FLOW_STAGES = {
    "sparse_structure_flow_model": ("ss_flow", "ss_flow", "ss"),
    "shape_slat_flow_model_512": ("shape_lr_cond", "shape_lr_flow", "shape lr"),
    "shape_slat_flow_model_1024": ("shape_hr_cond", "shape_hr_flow", "shape hr"),
    "tex_slat_flow_model_1024": ("tex_cond", "tex_flow", "texture"),
}
PATHS = ("fp32_eager_repeat", "bf16_eager", "fp8_simulated", "cuda", "engines")
DESCRIPTIONS = {
    "fp32_eager": "eager backend, every network in fp32, TF32 off (the reference)",
    "fp32_eager_repeat": "the reference path run again: the comparison's floor",
    "bf16_eager": "eager backend, flows bf16, decoders fp16 (upstream's precisions)",
    "fp8_simulated": "bf16_eager with the flows' block Linears fake-quantized to FP8 E4M3 as the fp8 engines "
                     "compute them (calibrated as export does); simulated in torch, not an engine",
    "cuda": "the cuda backend with bf16/fp16 torsos: what infer runs on a GPU",
    "engines": "the networks of the engine directory in place of the eager ones, as infer --engines",
}


def _is_flow(key: str) -> bool:
    return key.endswith("flow_model") or "_flow_model_" in key


class StageOutputs:
    """Takes a pipeline's stage outputs as one run passes (instance attributes shadow the sampler's
    and the conditioner's methods; forward hooks on the decoders); `values` maps
    (stage, output name) -> ("dense", tensor) or ("sparse", coords, feats), on the host, fp32."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.values: dict = {}

    def _put(self, stage, name, value):
        if hasattr(value, "coords") and hasattr(value, "feats"):
            self.values[(stage, name)] = ("sparse", value.coords.detach().cpu(), value.feats.detach().float().cpu())
        else:
            self.values[(stage, name)] = ("dense", value.detach().float().cpu())

    def __enter__(self):
        pipe = self.pipe
        keys = {id(f): k for k, f in pipe.flows.items()}
        sample, encode = pipe.sampler.sample, pipe.conditioner.encode

        def sampled(flow, noise, cond, neg_cond, *args, **kwargs):
            out = sample(flow, noise, cond, neg_cond, *args, **kwargs)
            stages = FLOW_STAGES.get(keys.get(id(flow)))
            if stages is not None:
                self._put(stages[0], f"{stages[2]} conditioning features", cond["proj"])
                self._put(stages[1], f"{stages[2]} latent", out)
            return out

        def encoded(image):
            enc = encode(image)
            size = image.shape[-1]
            self._put("dinov3_lr" if size == pipe.geometry.lr_image else "dinov3_hr", f"DINOv3 patch tokens @{size}px", enc.patch_map)
            return enc

        pipe.sampler.sample, pipe.conditioner.encode = sampled, encoded
        self.hooks = []
        for key, stage, name in (("sparse_structure_decoder", "ss_decoder", "occupancy logits"),
                                 ("shape_slat_decoder", "shape_decoder", "decoded shape voxels")):
            if key in pipe.models:
                self.hooks.append(pipe.models[key].register_forward_hook(
                    lambda mod, inp, out, stage=stage, name=name: self._put(stage, name, out[0] if isinstance(out, tuple) else out)))
        return self

    def __exit__(self, *exc):
        del self.pipe.sampler.sample, self.pipe.conditioner.encode  # the class methods again
        for h in self.hooks:
            h.remove()


class _SSLogits:
    """Keeps the last sparse-structure logits a pipeline's SS decoder computed (a forward hook)."""

    def attach(self, pipe):
        self.logits = None
        dec = pipe.models.get("sparse_structure_decoder")
        self._hook = dec.register_forward_hook(lambda mod, inp, out: setattr(self, "logits", out)) if dec is not None else None
        return self

    def detach(self):
        if self._hook is not None:
            self._hook.remove()

    def own_occupancy(self, device):
        from .models.ss_decoder import occupancy_to_coords

        return occupancy_to_coords(self.logits.float(), pool=True).to(device)  # as the pipeline computes it


class RecordingStructure(_SSLogits):
    """A pipeline structure that keeps the networks' own decisions (occupancy, each subdivision
    call's per-child decisions) and records them, for the paths to follow (`ReplayStructure`)."""

    name = "recorded"

    def __init__(self):
        self.occupancy_coords = None
        self.subdivisions = []  # per call, in order: (parent coords [N, 4] host, keep [N, 8] host)

    def occupancy(self, grid, device="cpu"):
        self.occupancy_coords = self.own_occupancy(device)
        return self.occupancy_coords

    def subdivision(self, coords, grid, logits, out_grid=None):
        self.subdivisions.append((coords.detach().cpu(), (logits > 0).cpu()))
        return logits

    def mesh_fields(self, h, grid, voxel_margin=0.5):
        return h


class ReplayStructure(_SSLogits):
    """Follows a recorded run's structure decisions, so that a path computes at the reference's
    voxels and draws its noise for the same tokens; counts the decisions its own networks would
    have made differently (`flips`)."""

    name = "replayed from the reference run"

    def __init__(self, recorded: RecordingStructure):
        self.recorded = recorded
        self.calls = 0
        self.flips = {"occupancy": None, "subdivision": []}

    def occupancy(self, grid, device="cpu"):
        own = self.own_occupancy(device).cpu()
        ref = self.recorded.occupancy_coords.cpu()
        ia, _ = match_rows(own, ref)
        union = own.shape[0] + ref.shape[0] - ia.numel()
        self.flips["occupancy"] = {"own_voxels": int(own.shape[0]), "ref_voxels": int(ref.shape[0]),
                                   "coord_iou": ia.numel() / union if union else 1.0}
        return self.recorded.occupancy_coords.to(device)

    def subdivision(self, coords, grid, logits, out_grid=None):
        ref_coords, ref_keep = self.recorded.subdivisions[self.calls]
        self.calls += 1
        ia, ib = match_rows(coords, ref_coords)
        own = (logits > 0).cpu()
        keep = own.clone()
        keep[ia] = ref_keep[ib]
        self.flips["subdivision"].append({"grid": int(grid), "parents": int(coords.shape[0]), "matched": int(ia.numel()),
                                          "decisions_changed": int((own[ia] != ref_keep[ib]).sum())})
        return torch.where(keep.to(logits.device), 1.0, -1.0).to(logits.dtype)

    def mesh_fields(self, h, grid, voxel_margin=0.5):
        return h

    def summary(self) -> dict:
        sub = self.flips["subdivision"]
        decisions = 8 * sum(r["matched"] for r in sub)
        return {"occupancy": self.flips["occupancy"], "subdivision_calls": sub,
                "subdivision_decisions_changed": sum(r["decisions_changed"] for r in sub),
                "subdivision_decisions": decisions}


def _with_torso(module, key: str, fp32: bool):
    """`module` with its torso in fp32 (fp32=True) or upstream's precision: itself when it is
    already there, else a converted copy (the loaded networks stay as they are)."""
    if _is_flow(key):
        want = torch.float32 if fp32 else FLOW_TORSO
        convert = lambda m: m.convert_to(want)  # noqa: E731
    elif "decoder" in key and hasattr(module, "convert_to_fp16"):
        want = torch.float32 if fp32 else DECODER_TORSO
        convert = lambda m: m.convert_to_fp32() if fp32 else m.convert_to_fp16()  # noqa: E731
    else:
        return module
    if getattr(module, "dtype", None) == want:
        return module
    copied = copy.deepcopy(module)
    convert(copied)
    return copied


def variant(pipe, backend: str, torso: str | None):
    """A Pipeline on the same weights: `backend` eager|cuda; torso "fp32", "upstream" or None (as
    loaded). Networks already at the wanted precision are shared, the others copied."""
    from .pipeline import Pipeline

    models = dict(pipe.w.models)
    if torso is not None:
        models = {k: _with_torso(m, k, torso == "fp32") for k, m in models.items()}
    w = dataclasses.replace(pipe.w, models=models)
    out = Pipeline(w, device=pipe.device, geometry=pipe.geometry, preset=pipe.preset, backend=backend)
    out.structure = pipe.structure
    return out


@contextlib.contextmanager
def strict_fp32():
    """fp32 matmuls and convolutions without TF32 (the reference's arithmetic)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def fp8_simulated(pipe, record: dict):
    """The pipeline's flows computing what fp8 engines compute (export/fp8.py's calibration,
    quantization and fake-quantized Linears); restored afterwards."""
    from .export import fp8

    specs = importlib.import_module(fp8.ExportSpec.__module__)  # where the export specs live
    w = pipe.w
    flows = [s for s in specs.build_specs(w.configs, w.dinov3_config, pipe.geometry)
             if s.kind in fp8.FP8_KINDS and s.model_key in pipe.models]
    with contextlib.ExitStack() as stack:
        for spec in flows:
            net = pipe.models[spec.model_key]
            calib = fp8.calibrate(spec, net)
            record[spec.model_key] = {"calibration": calib.settings, "quantized_linears": len(calib.input_amax)}
            stack.enter_context(fp8.fake_quantized(net, fp8.quantize_linears(net, calib)))
        yield


def _run(pipe, image, args, context=None) -> dict:
    structure = pipe.structure if isinstance(pipe.structure, _SSLogits) else None
    if structure is not None:
        structure.attach(pipe)
    shape_dec = pipe.models.get("shape_slat_decoder")
    saved = getattr(shape_dec, "structure", None)
    if shape_dec is not None:  # where the decoder takes its subdivisions from (shared networks: set per run)
        shape_dec.structure = pipe.structure
    try:
        with StageOutputs(pipe) as taps, (context or contextlib.nullcontext()):
            t0 = time.perf_counter()
            result = pipe.run(image, resolution=args["resolution"], seed=args["seed"], steps=args["steps"])
            wall = time.perf_counter() - t0
    finally:
        if structure is not None:
            structure.detach()
        if shape_dec is not None:
            shape_dec.structure = saved
    if result.voxel_attrs is not None:
        taps.values[("tex_decoder", "PBR voxel attributes")] = ("sparse", result.voxel_coords, result.voxel_attrs.float())
    return {"outputs": taps.values, "vertices": result.vertices, "faces": result.faces, "tokens": dict(result.tokens),
            "wall_s": wall}


def compare(run: dict, ref: dict, ref_points: torch.Tensor, points: int, tau: float) -> dict:
    """Each output of `ref` against the same output of `run`; the meshes by Chamfer and F-score."""
    rows = []
    for (stage, name), want in ref["outputs"].items():
        row = {"stage": stage, "output": name}
        got = run["outputs"].get((stage, name))
        if got is None:
            row.update({"rel_l2": None, "note": "not produced by this path"})
        elif want[0] == "sparse":
            row.update(sparse_rel_l2(got[1], got[2], want[1], want[2]))
        elif got[1].shape != want[1].shape:
            row.update({"rel_l2": None, "note": f"shape {tuple(got[1].shape)} vs {tuple(want[1].shape)}"})
        else:
            row["rel_l2"] = rel_l2(got[1], want[1])
        rows.append(row)
    mesh = chamfer_fscore(sample_surface(run["vertices"], run["faces"], points, MESH_SEED), ref_points, tau)
    mesh.update({"faces": int(run["faces"].shape[0]), "ref_faces": int(ref["faces"].shape[0])})
    finite = all(bool(torch.isfinite(v[-1]).all()) for v in run["outputs"].values()) and bool(torch.isfinite(run["vertices"]).all())
    return {"outputs": rows, "mesh": mesh, "tokens": run["tokens"], "wall_s": run["wall_s"], "finite": finite}


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quality_pass(pipe, args: dict, image, say=lambda msg: None, points: int = DEFAULT_POINTS, tau: float = DEFAULT_TAU) -> dict:
    """Run the reference and every available fast path on `image`; returns the report's `quality`."""
    from .errors import first_line

    cuda = pipe.device.type == "cuda"
    out = {"reference": "fp32_eager", "descriptions": DESCRIPTIONS, "seed": args["seed"], "steps": args["steps"],
           "resolution": args["resolution"], "paths": [], "unavailable": [],
           "mesh_metric": {"points": points, "seed": MESH_SEED, "tau": tau, "mesh": "the decoded mesh (Result.vertices/faces)",
                           "chamfer": "½(mean d(A→B) + mean d(B→A)) in the grid frame (object inside [-0.5, 0.5]³)"}}
    ref_pipe = variant(pipe, "eager", "fp32")
    if pipe.structure is None:  # the networks decide the structure: every path follows the reference's
        recorded = RecordingStructure()
        ref_pipe.structure = recorded
        held = lambda: ReplayStructure(recorded)  # noqa: E731
        out["structure"] = ("each path follows the reference run's structure decisions (occupancy, subdivisions) and "
                            "reports how many its own networks would have changed (structure_flips)")
    else:
        held = lambda: pipe.structure  # noqa: E731
        out["structure"] = f"the preset's structure ({pipe.structure.name}) in every path"
    with strict_fp32():
        ref = _run(ref_pipe, image, args)
    say(f"fp32 eager reference: {ref['wall_s']:.1f} s")
    ref_points = sample_surface(ref["vertices"], ref["faces"], points, MESH_SEED)
    floor = chamfer_fscore(sample_surface(ref["vertices"], ref["faces"], points, MESH_SEED + 1), ref_points, tau)
    out["mesh_metric"]["sampling_floor"] = {"chamfer": floor["chamfer"], "f_score": floor["f_score"],
                                            "what": "the reference mesh against itself sampled with another seed"}
    out["reference_run"] = {"wall_s": ref["wall_s"], "tokens": ref["tokens"], "mesh_faces": int(ref["faces"].shape[0])}

    def take(name, make, context=None, extra=None):
        say(f"quality path {name}")
        entry = {"path": name, "description": DESCRIPTIONS[name], **(extra or {})}
        try:
            p = make()
            p.structure = held()
            run = _run(p, image, args, context(p) if context else None)
            entry.update(compare(run, ref, ref_points, points, tau))
            if isinstance(p.structure, ReplayStructure):
                entry["structure_flips"] = p.structure.summary()
            worst = max((r["rel_l2"] for r in entry["outputs"] if r.get("rel_l2") is not None), default=None)
            say(f"quality path {name}: worst rel L2 {worst}, Chamfer {entry['mesh']['chamfer']}, F {entry['mesh']['f_score']}")
        except Exception as e:  # a path that fails is reported; the others still run
            entry["error"] = f"{type(e).__name__}: {first_line(e)}"
            say(f"quality path {name} failed: {entry['error']}")
        out["paths"].append(entry)
        _free()

    take("fp32_eager_repeat", lambda: ref_pipe, context=lambda p: strict_fp32())
    ref_pipe = None  # its fp32 copies of the networks go before the other paths run
    _free()
    take("bf16_eager", lambda: variant(pipe, "eager", "upstream"))
    fp8_record = {}
    take("fp8_simulated", lambda: variant(pipe, "eager", "upstream"), context=lambda p: fp8_simulated(p, fp8_record),
         extra={"fp8": fp8_record})
    if cuda:
        take("cuda", lambda: variant(pipe, "cuda", "upstream"))
    else:
        out["unavailable"].append({"path": "cuda", "reason": "the cuda backend needs a CUDA device"})
    engines = args.get("engines")
    if engines:
        engine_record = {"dir": str(engines)}

        def with_engines():
            from .runtime.tensorrt_engine import read_manifest, use_engines

            p = variant(pipe, pipe.backend, None)
            engine_record["replaced"] = use_engines(p, engines)
            manifest = read_manifest(engines)
            engine_record["target"] = manifest.get("target")
            engine_record["networks"] = {n: {"precision": e.get("precision"), "device": e.get("device")}
                                         for n, e in manifest.get("networks", {}).items()}
            return p

        take("engines", with_engines, extra={"engines": engine_record})
    else:
        out["unavailable"].append({"path": "engines", "reason": "no engine directory given (--engines DIR)"})
    return out


def markdown(quality: dict) -> list[str]:
    """The quality table: one row per stage output (and the mesh), one column per path."""
    paths = quality["paths"]
    mm = quality["mesh_metric"]
    floor = mm.get("sampling_floor", {})
    lines = ["", f"### quality against the fp32 eager path (same preset, image, seed {quality['seed']}; "
                 f"relative L2 error; sparse outputs over the voxels both hold, coord IoU in brackets when below 1)", ""]
    lines.append("| stage | output | " + " | ".join(p["path"] for p in paths) + " |")
    lines.append("|---|---|" + "---:|" * len(paths))
    order = [(r["stage"], r["output"]) for p in paths if "outputs" in p for r in p["outputs"]]
    seen = []
    for key in order:
        if key not in seen:
            seen.append(key)
    for stage, name in seen:
        cells = []
        for p in paths:
            row = next((r for r in p.get("outputs", []) if (r["stage"], r["output"]) == (stage, name)), None)
            cells.append(_cell(row, p))
        lines.append(f"| {stage} | {name} | " + " | ".join(cells) + " |")
    if any("structure_flips" in p for p in paths):
        iou = [_num(p["structure_flips"]["occupancy"]["coord_iou"]) if "structure_flips" in p else "–" for p in paths]
        lines.append("| ss_decoder | own occupancy vs the reference's (coord IoU; the reference's is used) | " + " | ".join(iou) + " |")
        changed = [f"{p['structure_flips']['subdivision_decisions_changed']:,} of {p['structure_flips']['subdivision_decisions']:,}"
                   if "structure_flips" in p else "–" for p in paths]
        lines.append("| upsample, shape_decoder | own subdivision decisions that differ (the reference's are used) | "
                     + " | ".join(changed) + " |")
    for label, key, fmt in (("mesh Chamfer", "chamfer", "{:.2e}"), (f"mesh F-score@{mm['tau']}", "f_score", "{:.4f}")):
        cells = [("failed" if "error" in p else ("–" if p["mesh"].get(key) is None else fmt.format(p["mesh"][key]))) for p in paths]
        lines.append(f"| mesh_extraction | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Structure: {quality['structure']}.", f"Mesh: {mm['points']:,} area-weighted samples per surface (seed {mm['seed']}); Chamfer = {mm['chamfer']}; "
                  f"two samplings of the reference surface give Chamfer {_num(floor.get('chamfer'))}, F-score {_num(floor.get('f_score'))}."]
    for p in paths:
        note = f"- {p['path']}: {p['description']}"
        note += f"; failed: {p['error']}" if "error" in p else f"; one run {p['wall_s']:.1f} s"
        lines.append(note)
    for u in quality.get("unavailable", []):
        lines.append(f"- {u['path']}: not run ({u['reason']})")
    return lines


def _num(v):
    return "–" if v is None else f"{v:.3g}"


def _cell(row, path):
    if "error" in path:
        return "failed"
    if row is None or row.get("rel_l2") is None:
        return "–"
    cell = f"{row['rel_l2']:.2e}"
    if row.get("coord_iou") is not None and row["coord_iou"] < 1:
        cell += f" ({row['coord_iou']:.3f})"
    return cell
