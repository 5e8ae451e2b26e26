"""`pixal3d-rt bench --upstream DIR`: upstream's own modules beside ours, stage by stage, in one process.

DIR holds upstream's `pixal3d` package (its source tree; never part of this repository). One run of
our pipeline records each network call's inputs (`ModuleCalls`); then, per stage, our call and the
same call into upstream's module, built from the same config and loaded with our weights, are each
run once to warm up and `reps` times timed, alternating, on the same inputs. Reported per stage:
median seconds of both, the ratio ours / upstream, upstream's output against ours (relative L2), and
on CUDA the peak allocated memory of each call.

What runs on upstream's side:
  dinov3_lr/_hr       its DinoV3FeatureExtractor on our DINOv3 weights (transformers' model)
  ss_flow, *_flow     its flow transformers inside our sampler: same noise, conditions and settings,
                      sequential CFG as upstream's sampler (the adapter keeps one SparseTensor per
                      stage, as upstream's sampler does)
  ss_decoder          its SparseStructureDecoder
  upsample,           its FlexiDualGridVaeDecoder (upsample; the decoding network without the mesh
  shape_decoder       step, which needs o_voxel); with a preset's reference structure its predicted
                      subdivisions are replaced by the structure's, exactly as ours are
  tex_decoder         its SparseUnetVaeDecoder guided by our shape decoder's subdivisions
Not run (marked with the reason, never estimated): preprocessing, the NAF conditioning stages
(valeoai/NAF from torch.hub with natten, and upstream's dense projection, live outside its `pixal3d`
modules), mesh extraction (o_voxel's CUDA extension) and the GLB export (CuMesh, nvdiffrast).

The package is mapped without running `pixal3d/__init__.py` (which imports upstream's whole
pipeline: background removal, renderers, ...): only the modules a stage needs are imported. A
missing o_voxel (imported at the top of upstream's shape decoder module for its mesh step) is
replaced by a module that raises if called, recorded in the report; FlexGEMM (upstream's sparse
convolution) is required as upstream requires it.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from .tools.metrics import match_rows, rel_l2, sparse_rel_l2

NOT_RUN = {
    "preprocess": "host image preparation; upstream's removes the background with BiRefNet: not the same work",
    "shape_lr_cond": "upstream's conditioning runs valeoai/NAF (torch.hub, natten) and its dense projection in its pipeline "
                     "code, outside its `pixal3d` modules",
    "mesh_extraction": "upstream extracts the mesh with o_voxel's CUDA extension",
    "glb_export": "upstream's GLB post-processing needs CuMesh and nvdiffrast (CUDA extensions)",
}
NOT_RUN["shape_hr_cond"] = NOT_RUN["tex_cond"] = NOT_RUN["shape_lr_cond"]
FLOW_STAGES = {"sparse_structure_flow_model": "ss_flow", "shape_slat_flow_model_512": "shape_lr_flow",
               "shape_slat_flow_model_1024": "shape_hr_flow", "tex_slat_flow_model_1024": "tex_flow"}


class UpstreamUnavailable(Exception):
    """DIR holds no upstream package that imports here (one line, for the CLI)."""


class Upstream:
    """Upstream's modules from the folder holding its `pixal3d` package."""

    def __init__(self, path):
        from .errors import first_line

        path = Path(path).resolve()
        pkg = path / "pixal3d"
        if not (pkg / "models" / "__init__.py").is_file():
            raise UpstreamUnavailable(f"{path}: no upstream package here (expected {pkg}/models/__init__.py)")
        loaded = sys.modules.get("pixal3d")
        if loaded is not None and list(getattr(loaded, "__path__", [])) != [str(pkg)]:
            raise UpstreamUnavailable(f"{path}: another `pixal3d` package is already imported in this process")
        # upstream defaults to flash-attn; SDPA is what every torch has (both run the same attention)
        os.environ.setdefault("ATTN_BACKEND", "sdpa")
        os.environ.setdefault("SPARSE_ATTN_BACKEND", "sdpa")
        if loaded is None:
            shell = types.ModuleType("pixal3d")
            shell.__path__ = [str(pkg)]  # a package whose __init__ is not run
            sys.modules["pixal3d"] = shell
        self.path, self.stubs = path, []
        try:
            self.models = importlib.import_module("pixal3d.models")
            self.sp = importlib.import_module("pixal3d.modules.sparse")
            self.sp.SparseTensor  # noqa: B018  (a lazy attribute: imports the sparse tensor module)
        except Exception as e:
            raise UpstreamUnavailable(f"{path}: upstream's package does not import here: {type(e).__name__}: {first_line(e)}") from None

    def module(self, name: str):
        return importlib.import_module(f"pixal3d.{name}")

    def network_class(self, class_name: str):
        if class_name == "FlexiDualGridVaeDecoder":
            self._stub_missing("o_voxel", "o_voxel.convert")
        return getattr(self.models, class_name)

    def _stub_missing(self, *names):
        """Modules imported only for a step that is not run: a stand-in that raises when used."""
        if importlib.util.find_spec(names[0]) is not None:
            return
        for name in names:
            mod = types.ModuleType(name)
            mod.__getattr__ = lambda attr, name=name: _refuse(f"{name}.{attr}")
            sys.modules[name] = mod
        self.stubs.append(f"{names[0]} (not installed): a stand-in that raises if called; the step using it is not run")

    def build(self, config: dict, state_dict: dict, device):
        """Upstream's network for a config, loaded strictly with our weights."""
        with torch.device(device):
            net = self.network_class(config["name"])(**config["args"])
        net.load_state_dict(state_dict, strict=True)
        return net.eval().requires_grad_(False)

    def sparse(self, s):
        return self.sp.SparseTensor(s.feats, s.coords)


def _refuse(what):
    raise RuntimeError(f"{what}: not available (stand-in for a module that is not installed)")


def check(path) -> str | None:
    """None when DIR's upstream package imports (in a fresh process), else the reason in one line."""
    r = subprocess.run([sys.executable, "-m", "pixal3d_rt.bench_upstream", str(path)], capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"{path}: checking upstream's package failed (status {r.returncode})"


# ---------------------------------------------------------------------------------------------
# one run's network calls


class ModuleCalls:
    """Records, during one run of our pipeline, the inputs of each network call (instance attributes
    shadow the sampler's, the conditioner's and the shape decoder's upsample methods; forward
    pre-hooks on the decoders)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: dict = {}

    def __enter__(self):
        pipe, calls = self.pipe, self.calls
        models = {id(m): k for k, m in pipe.models.items()}
        sample, encode = pipe.sampler.sample, pipe.conditioner.encode

        def flow_key(flow):
            return models.get(id(flow)) or models.get(id(getattr(flow, "model", None)))

        def sampled(flow, noise, cond, neg_cond, **kwargs):
            key = flow_key(flow)
            if key in FLOW_STAGES:
                kept = {k: v for k, v in kwargs.items() if k != "progress"}
                calls[FLOW_STAGES[key]] = {"key": key, "flow": flow, "noise": noise.clone() if torch.is_tensor(noise)
                                           else noise.replace(noise.feats.clone()), "cond": cond, "neg": neg_cond, "kwargs": kept}
            return sample(flow, noise, cond, neg_cond, **kwargs)

        def encoded(image):
            size = image.shape[-1]
            calls["dinov3_lr" if size == pipe.geometry.lr_image else "dinov3_hr"] = {"image": image.clone()}
            return encode(image)

        pipe.sampler.sample, pipe.conditioner.encode = sampled, encoded
        self.hooks = []
        shape_dec = pipe.models.get("shape_slat_decoder")
        if shape_dec is not None:
            upsample = shape_dec.upsample

            def upsampled(x, upsample_times):
                calls["upsample"] = {"x": x, "times": upsample_times, "resolution": shape_dec.resolution}
                return upsample(x, upsample_times=upsample_times)

            shape_dec.upsample = upsampled
            self.hooks.append(shape_dec.register_forward_pre_hook(
                lambda mod, args, kwargs: calls.__setitem__("shape_decoder", {"x": args[0], "resolution": mod.resolution}),
                with_kwargs=True))
        tex_dec = pipe.models.get("tex_slat_decoder")
        if tex_dec is not None:
            self.hooks.append(tex_dec.register_forward_pre_hook(
                lambda mod, args, kwargs: calls.__setitem__("tex_decoder", {"x": args[0], "guide_subs": kwargs.get("guide_subs"),
                                                                            "cache": kwargs.get("cache")}), with_kwargs=True))
        ss_dec = pipe.models.get("sparse_structure_decoder")
        if ss_dec is not None:
            self.hooks.append(ss_dec.register_forward_pre_hook(lambda mod, args: calls.__setitem__("ss_decoder", {"z": args[0]})))
        return self

    def __exit__(self, *exc):
        del self.pipe.sampler.sample, self.pipe.conditioner.encode
        shape_dec = self.pipe.models.get("shape_slat_decoder")
        if shape_dec is not None and "upsample" in vars(shape_dec):
            del shape_dec.upsample
        for h in self.hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """(output, seconds, peak allocated bytes on CUDA or None) of one call."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    return out, seconds, (int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None)


def side_by_side(ours, theirs, reps: int, device) -> dict:
    """Warm-up call of each, then `reps` timed calls of each, alternating (drift shows in both)."""
    out_ours, _, _ = _timed(ours, device)
    out_up, _, _ = _timed(theirs, device)
    t_ours, t_up, peak_ours, peak_up = [], [], [], []
    for _ in range(reps):
        _, s, p = _timed(ours, device)
        t_ours.append(s), peak_ours.append(p)
        _, s, p = _timed(theirs, device)
        t_up.append(s), peak_up.append(p)
    ours_s, up_s = statistics.median(t_ours), statistics.median(t_up)
    row = {"ours_s": ours_s, "upstream_s": up_s, "ratio_ours_over_upstream": ours_s / up_s if up_s > 0 else None,
           "ours_runs_s": t_ours, "upstream_runs_s": t_up}
    if device.type == "cuda":
        row.update({"ours_peak_allocated_bytes": max(peak_ours), "upstream_peak_allocated_bytes": max(peak_up)})
    return row, out_ours, out_up


# ---------------------------------------------------------------------------------------------
# the stages


class UpstreamFlow:
    """Upstream's flow network behind our sampler's model interface (sequential CFG, as upstream's
    sampler): one SparseTensor per stage whose features are replaced each step (upstream's sampler
    does the same, so its caches carry over); conditions converted once."""

    def __init__(self, upstream: Upstream, net, dense: bool):
        self.up, self.net, self.dense = upstream, net, dense
        self._x, self._conds = None, {}

    def __call__(self, x, t, cond, concat_cond=None):
        if self.dense:
            return self.net(x, t, cond)
        key = id(cond)
        if key not in self._conds:  # the dict itself is kept so that its id stays its own
            self._conds[key] = (cond, {"global": cond["global"], "proj": self.up.sparse(cond["proj"])},
                                None if concat_cond is None else self.up.sparse(concat_cond))
        _, c, cc = self._conds[key]
        self._x = self.up.sparse(x) if self._x is None else self._x.replace(x.feats)
        return x.replace(self.net(self._x, t, c, concat_cond=cc).feats)


def _feats(v):
    return v.feats if hasattr(v, "feats") else v


def _structure_hooks(net, structure):
    """Forward hooks on upstream's subdivision heads that replace their output by the structure's
    decision, as our decoder's structure branch does (level i's grid = resolution·2^i / 2^levels)."""
    if structure is None:
        return []
    heads = [blocks[-1].to_subdiv for blocks in net.blocks[:-1] if hasattr(blocks[-1], "to_subdiv")]
    levels = len(net.blocks) - 1

    def hook(i):
        def replace(mod, args, out):
            grid = net.resolution * 2 ** i // 2 ** levels
            return out.replace(structure.subdivision(out.coords, grid, out.feats, net.resolution))
        return replace

    return [h.register_forward_hook(hook(i)) for i, h in enumerate(heads)]


def _dinov3_stage(pipe, up, call, device, reps):
    from .models.dinov3 import IMAGENET_MEAN, IMAGENET_STD

    cls = up.module("modules.image_feature_extractor").DinoV3FeatureExtractor
    ext = cls.__new__(cls)  # its __init__ downloads weights by name: ours are given instead
    image = call["image"]
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    # its transform: torchvision's Normalize, whose arithmetic this is
    ext.model, ext.image_size, ext.transform = pipe.w.dinov3, image.shape[-1], lambda x: (x - mean) / std
    row, enc, tokens = side_by_side(lambda: pipe.conditioner.encode(image), lambda: ext(image), reps, device)
    ours = torch.cat([enc.global_tokens, enc.patch_map.flatten(2).transpose(1, 2)], 1)
    row["rel_l2_upstream_vs_ours"] = rel_l2(tokens.float(), ours)
    row["what"] = "one DINOv3 encoding (upstream's pipeline encodes once per stage, ours once per image size)"
    return row


def _flow_stage(pipe, up, call, device, reps):
    key = call["key"]
    ours_net = pipe.models[key]
    net = up.build(pipe.w.configs[key], ours_net.state_dict(), device)
    adapter = UpstreamFlow(up, net, dense=torch.is_tensor(call["noise"]))
    kw = dict(call["kwargs"])
    up_kw = {k: v for k, v in kw.items() if k != "batched_cfg"}  # upstream's modules have no CFG pair: sequential

    def ours():
        out = pipe.sampler.sample(call["flow"], call["noise"], call["cond"], call["neg"], **kw)
        pipe._release(call["flow"])
        return out

    def theirs():
        adapter._x = None  # a fresh stage, as upstream's sampler starts one
        return pipe.sampler.sample(adapter, call["noise"], call["cond"], call["neg"], **up_kw)

    row, out_ours, out_up = side_by_side(ours, theirs, reps, device)
    row["rel_l2_upstream_vs_ours"] = rel_l2(_feats(out_up).float(), _feats(out_ours).float())
    row["what"] = f"the stage's sampling loop ({kw.get('steps', '?')} steps) with upstream's {pipe.w.configs[key]['name']}"
    return row


def _ss_decoder_stage(pipe, up, call, device, reps):
    key = "sparse_structure_decoder"
    net = up.build(pipe.w.configs[key], pipe.models[key].state_dict(), device)
    z = call["z"]
    row, a, b = side_by_side(lambda: pipe.models[key](z), lambda: net(z.to(next(net.parameters()).dtype)), reps, device)
    row["rel_l2_upstream_vs_ours"] = rel_l2(b.float(), a.float())
    row["what"] = "the decoder on the sampled SS latent"
    return row


def _shape_decoder(pipe, up, device):
    key = "shape_slat_decoder"
    return pipe.models[key], up.build(pipe.w.configs[key], pipe.models[key].state_dict(), device)


def _upsample_stage(pipe, up, call, device, reps, nets):
    ours_dec, net = nets
    x, res = call["x"], call["resolution"]
    hooks = _structure_hooks(net, pipe.structure)
    ours_dec.structure = pipe.structure

    def ours():
        ours_dec.set_resolution(res)
        return ours_dec.upsample(x, upsample_times=call["times"])

    def theirs():
        net.set_resolution(res)
        return net.upsample(up.sparse(x), upsample_times=call["times"])

    try:
        row, a, b = side_by_side(ours, theirs, reps, device)
    finally:
        for h in hooks:
            h.remove()
    ia, _ = match_rows(b, a)
    union = a.shape[0] + b.shape[0] - ia.numel()
    row["coord_iou_upstream_vs_ours"] = ia.numel() / union if union else 1.0
    row["what"] = "the shape decoder's upsampling to the HR token set"
    return row


def _shape_decoder_stage(pipe, up, call, device, reps, nets):
    ours_dec, net = nets
    x, res = call["x"], call["resolution"]
    base = up.module("models.sc_vaes.sparse_unet_vae").SparseUnetVaeDecoder
    hooks = _structure_hooks(net, pipe.structure)
    ours_dec.structure = pipe.structure

    def ours():
        ours_dec.set_resolution(res)
        return ours_dec(x, return_subs=True, cache={})[0]

    def theirs():
        net.set_resolution(res)
        return base.forward(net, up.sparse(x), return_subs=True)[0]  # the network, without the o_voxel mesh step

    try:
        row, a, b = side_by_side(ours, theirs, reps, device)
    finally:
        for h in hooks:
            h.remove()
    row.update({f"{k}_upstream_vs_ours" if k in ("rel_l2", "coord_iou") else k: v
                for k, v in sparse_rel_l2(b.coords, b.feats.float(), a.coords, a.feats.float()).items()})
    row["what"] = "the shape decoder's network (upstream's forward without its mesh step)"
    return row


def _tex_decoder_stage(pipe, up, call, device, reps):
    key = "tex_slat_decoder"
    net = up.build(pipe.w.configs[key], pipe.models[key].state_dict(), device)
    x, subs, cache = call["x"], call["guide_subs"], call["cache"]
    up_subs = [up.sparse(s) for s in subs]
    row, a, b = side_by_side(lambda: pipe.models[key](x, guide_subs=subs, cache=cache),
                             lambda: net(up.sparse(x), guide_subs=up_subs), reps, device)
    row.update({f"{k}_upstream_vs_ours" if k in ("rel_l2", "coord_iou") else k: v
                for k, v in sparse_rel_l2(b.coords, b.feats.float(), a.coords, a.feats.float()).items()})
    row["what"] = ("the texture decoder guided by the shape decoder's subdivisions (ours reuses the shape decoder's "
                   "neighbour maps, as in the pipeline)")
    return row


def upstream_pass(pipe, args: dict, image, upstream_dir, say=lambda msg: None) -> dict:
    """Every stage of one run at args["resolution"] on our modules and upstream's; the report's `upstream`."""
    from .errors import first_line
    from .runtime.stages import stages_for

    device = pipe.device
    reps = max(1, int(args.get("runs", 2)))
    up = Upstream(upstream_dir)
    with ModuleCalls(pipe) as rec:
        pipe.run(image, resolution=args["resolution"], seed=args["seed"], steps=args["steps"])
    calls = rec.calls
    out = {"dir": str(up.path), "timed_calls": reps, "backend": pipe.backend, "stages": [],
           "method": "per stage: one warm-up call of each side, then the timed calls alternating ours / upstream; medians; "
                     "same inputs (recorded from one run of our pipeline) and weights"}
    nets = None
    for st in stages_for(args["resolution"], with_glb=True):
        name = st.name
        row = {"stage": name}
        if name in NOT_RUN:
            row["not_run"] = NOT_RUN[name]
        elif name not in calls:
            row["not_run"] = "this run made no such call"
        else:
            say(f"upstream side by side: {name}")
            try:
                if name.startswith("dinov3"):
                    row.update(_dinov3_stage(pipe, up, calls[name], device, reps))
                elif name in FLOW_STAGES.values():
                    row.update(_flow_stage(pipe, up, calls[name], device, reps))
                elif name == "ss_decoder":
                    row.update(_ss_decoder_stage(pipe, up, calls[name], device, reps))
                elif name in ("upsample", "shape_decoder"):
                    nets = nets or _shape_decoder(pipe, up, device)
                    fn = _upsample_stage if name == "upsample" else _shape_decoder_stage
                    row.update(fn(pipe, up, calls[name], device, reps, nets))
                elif name == "tex_decoder":
                    nets = None  # the shape decoders are no longer needed
                    row.update(_tex_decoder_stage(pipe, up, calls[name], device, reps))
                else:
                    row["not_run"] = "no upstream module is mapped to this stage"
            except Exception as e:  # upstream's module cannot run here: said so, the other stages go on
                row["not_run"] = f"upstream's module failed here: {type(e).__name__}: {first_line(e)}"
            if "ratio_ours_over_upstream" in row:
                say(f"upstream side by side: {name}: ours {row['ours_s']:.3f} s, upstream {row['upstream_s']:.3f} s")
        out["stages"].append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["stand_ins"] = list(up.stubs)
    compared = [r for r in out["stages"] if "ratio_ours_over_upstream" in r]
    if compared:
        ours_s, up_s = sum(r["ours_s"] for r in compared), sum(r["upstream_s"] for r in compared)
        out["compared_total"] = {"stages": [r["stage"] for r in compared], "ours_s": ours_s, "upstream_s": up_s,
                                 "ratio_ours_over_upstream": ours_s / up_s if up_s > 0 else None}
    return out


def markdown(upstream: dict) -> list[str]:
    lines = ["", f"### side by side with upstream's modules ({upstream['dir']}; same inputs and weights, "
                 f"{upstream['timed_calls']} timed call(s) each, medians; ratio = ours / upstream)", "",
             "| stage | ours s | upstream s | ours / upstream | upstream vs ours (rel L2) | note |", "|---|---:|---:|---:|---:|---|"]
    for r in upstream["stages"]:
        if "not_run" in r:
            lines.append(f"| {r['stage']} | – | – | not run | – | {r['not_run']} |")
            continue
        err, iou = r.get("rel_l2_upstream_vs_ours"), r.get("coord_iou_upstream_vs_ours")
        if err is None:
            err = "–" if iou is None else f"coord IoU {iou:.3f}"
        else:
            err = f"{err:.1e}" + (f" (coord IoU {iou:.3f})" if iou is not None and iou < 1 else "")
        lines.append(f"| {r['stage']} | {r['ours_s']:.3f} | {r['upstream_s']:.3f} | {r['ratio_ours_over_upstream']:.2f} | {err} | "
                     f"{r['what']} |")
    t = upstream.get("compared_total")
    if t:
        lines.append(f"| **compared stages** | **{t['ours_s']:.3f}** | **{t['upstream_s']:.3f}** | "
                     f"**{t['ratio_ours_over_upstream']:.2f}** | | {', '.join(t['stages'])} |")
    for s in upstream.get("stand_ins", []):
        lines.append(f"- stand-in: {s}")
    return lines


def main(argv=None):
    """python -m pixal3d_rt.bench_upstream DIR: exit 0 when DIR's upstream package imports, else
    print the reason in one line on stderr and exit 1."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        Upstream(argv[0])
    except UpstreamUnavailable as e:
        print(str(e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
