"""The eager Pixal3D pipeline: image → conditioning → 4 flow stages → decoders → mesh → GLB.

Follows upstream `Pixal3DImageTo3DPipeline.run` (pixal3d.md §4) step for step, including the order
in which noise is drawn after `manual_seed(seed)`, so the same weights and seed give upstream's
latents. What differs is only where upstream wastes work: DINOv3 runs once per image size and is
shared by the stages (upstream keeps four copies), and projection features are sampled at the
active voxels instead of on a dense R³ grid that is then gathered.

Frames: token coordinates (x, y, z) are grid indices with x = image right, y = image up,
z = toward the camera (pixal3d.md §1.2). The GLB's axes are documented in mesh/glb.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import config as C
from .checkpoints import HIRES_ONLY, Weights, load_weights
from .errors import BudgetError, InputImageError, StageOutOfMemory
from .kernels.subm_conv import gather_chunk_bytes
from .runtime.stages import networks_for, stages_for
from .models.sparse import SparseTensor
from .progress import as_progress


@dataclass
class Result:
    """What `Pipeline.run` produces: the decoded mesh and PBR voxels, plus measurements.
    `save_glb(path)` writes the asset; `to_trimesh()` gives it as a textured trimesh.Trimesh."""

    vertices: torch.Tensor  # [V,3] float32, grid frame inside [-0.5, 0.5]^3
    faces: torch.Tensor  # [F,3] int32
    voxel_coords: torch.Tensor | None  # [M,3] int32 at `resolution` (None: shape only)
    voxel_attrs: torch.Tensor | None  # [M,6] float32 in [0,1]: base colour 0:3, metallic 3, roughness 4, alpha 5
    resolution: int  # output grid resolution (mesh and voxels)
    timings: list = field(default_factory=list)  # (stage, seconds, detail)
    tokens: dict = field(default_factory=dict)
    latents: dict = field(default_factory=dict)  # shape_slat / tex_slat SparseTensors (for tests and tools)
    export_defaults: dict = field(default_factory=dict)  # texture_size, decimation_target, device of the bake
    plan: object = None  # runtime.planner.Plan the run executed (None: unbudgeted, everything resident)
    stage_peaks: list = field(default_factory=list)  # with a memory probe: per stage start/peak bytes

    def _export_args(self, texture_size, decimation_target, export=None, **options) -> dict:
        from .mesh.modes import export_settings

        d = self.export_defaults
        defaults = {"texture_size": d.get("texture_size", 2048), "decimation_target": d.get("decimation_target", 200_000),
                    "device": d.get("device")}
        args = export_settings(export, defaults, texture_size=texture_size, decimation_target=decimation_target, **options)
        args["texture_size"], args["decimation_target"] = int(args["texture_size"]), int(args["decimation_target"])
        return args

    def save_glb(self, path, texture_size: int | None = None, decimation_target: int | None = None, progress=None,
                 *, export: str | None = None, texture_format: str | None = None, **options) -> dict:
        """Simplify, unwrap, bake the PBR textures and write a GLB at `path` (atomically: the old file
        or the complete new one). Returns stats: faces, vertices, texture_size, bytes, timings.
        export: "fast" (default) or "upstream" (mesh/modes.py); texture_format "png" | "webp"; other
        keyword arguments go to `export_glb` / `build_asset` (remesh, remesh_band, double_sided, ...);
        preview=PATH also writes rendered views of the GLB there as a PNG (mesh/preview.py)."""
        from .mesh.glb import export_glb

        preview = options.pop("preview", None)
        args = self._export_args(texture_size, decimation_target, export, texture_format=texture_format, **options)
        t0 = time.perf_counter()
        say = as_progress(progress)
        say.stage("glb_export", f"{self.faces.shape[0]:,} faces → ≤{args['decimation_target']:,}, texture {args['texture_size']}²")
        with _memory_budget("glb_export"):  # the bake runs on the GPU
            stats = dict(export_glb(Path(path), self.vertices, self.faces, self.voxel_coords, self.voxel_attrs, self.resolution,
                                    progress=say.note, **args))
        stats["glb_timings"] = stats.pop("timings", {})  # per step: clean, simplify, uv, bake, write
        if preview is not None:
            from .mesh.preview import write_preview

            t = time.perf_counter()
            write_preview(path, preview)
            stats["glb_timings"]["preview"] = time.perf_counter() - t
            stats["preview"] = str(preview)
        seconds = time.perf_counter() - t0
        stats["timings"] = [("glb_export", seconds, f"texture {args['texture_size']}²")]
        say.stage_done("glb_export", seconds)
        return stats

    def to_trimesh(self, texture_size: int | None = None, decimation_target: int | None = None, *,
                   export: str | None = None, **options):
        """The asset as save_glb writes it (GLB axes, UVs, PBR material), as a trimesh.Trimesh
        (None when no face survives cleaning)."""
        from .mesh.glb import build_asset

        args = self._export_args(texture_size, decimation_target, export, **options)
        args.pop("image_format", None)  # an encoding setting: build_asset makes the mesh only
        mesh, _ = build_asset(self.vertices, self.faces, self.voxel_coords, self.voxel_attrs, self.resolution, **args)
        return mesh


def out_of_memory(e: BaseException, stage: str) -> BudgetError | None:
    """A stage's allocation failure (CUDA, or the CPU allocator under a memory limit) as the one-line
    BudgetError the CLI prints, or None for any other exception."""
    from .errors import first_line

    if isinstance(e, torch.cuda.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a batch goes on with the next image
        return BudgetError(f"{stage}: out of GPU memory ({first_line(e)}); free the GPU of other programs or use a "
                           "lower --resolution (1024, or 512 for shape only)")
    if isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e):
        return BudgetError(f"{stage}: out of memory ({first_line(e)}); free memory or use a lower --resolution")
    return None


@contextlib.contextmanager
def _memory_budget(stage: str):
    try:
        yield
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        oom = out_of_memory(e, stage)
        if oom is None:
            raise
        raise oom from None


class _Stopwatch:
    """Times each stage (and, with a memory probe, its peak: rows of `peaks`)."""

    def __init__(self, device, progress, probe=None):
        self.device, self.progress, self.rows, self.probe, self.peaks = device, progress, [], probe, []

    def __call__(self, name: str, detail: str = ""):
        sw = self

        class _Span:
            def __enter__(self):
                sw.progress.stage(name, detail)
                if sw.probe is not None:
                    self.start = sw.probe.live()
                    sw.probe.begin()
                self.t = time.perf_counter()
                return self

            def __exit__(self, *exc):
                oom = out_of_memory(exc[1], name) if exc[1] is not None else None
                if oom is not None:
                    raise StageOutOfMemory(str(oom)) from None
                if exc[0] is None:
                    if str(sw.device).startswith("cuda"):
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - self.t
                    sw.rows.append((name, seconds, detail))
                    if sw.probe is not None:
                        transient = sw.probe.end()
                        sw.peaks.append({"stage": name, "start": self.start, "peak": self.start + transient, "seconds": seconds})
                    sw.progress.stage_done(name, seconds, detail)

        return _Span()


def _sampler_progress(progress, name):
    return lambda i, n: progress.step(name, i, n)


class Pipeline:
    """Pixal3D image → 3D asset. Build with `from_pretrained` (official weights, a directory or Hugging
    Face id) or `from_preset` ("tiny"); `run(image)` returns a Result to `save_glb(path)`."""

    def __init__(self, weights: Weights, device="cpu", geometry: C.Geometry = C.FULL, preset: str | None = None,
                 backend: str | None = None):
        from .conditioning import ImageConditioner
        from .sampler import FlowEulerGuidanceIntervalSampler

        self.sampler = FlowEulerGuidanceIntervalSampler(sigma_min=C.SIGMA_MIN)
        self.w = weights
        self.device = torch.device(device)
        self.geometry = geometry
        self.preset = preset
        self.models = weights.models
        self.load_seconds = 0.0  # set by the constructors: reading (or building) the networks
        # optional structure source (the reference preset's shape): replaces, after the networks have
        # computed them, the sparse-structure occupancy, the shape decoder's subdivisions and its mesh
        # channels; see reference_shape.ReferenceStructure
        self.structure = None
        # flow networks as the sampler calls them: the eager definitions, or the `cuda` backend wrapping
        # the same modules (bf16, batched CFG, stage constants, CUDA graphs); default cuda on a GPU
        self.backend = backend or ("cuda" if self.device.type == "cuda" else "eager")
        if self.backend not in ("eager", "cuda"):
            raise ValueError(f"unknown backend {self.backend!r} (eager or cuda)")
        if self.backend == "cuda" and self.device.type != "cuda":
            raise BudgetError("the cuda backend needs a CUDA device")
        self.flows = {k: m for k, m in self.models.items() if k.endswith("flow_model") or "_flow_model_" in k}
        if self.backend == "cuda":
            from .runtime.cuda_backend import wrap_flow

            # networks already on the device are wrapped now; ones on the host when their stage needs them
            self.flows = {k: wrap_flow(m, k) if _on(m, self.device) else m for k, m in self.flows.items()}
        # memory planning (runtime/planner.py): None runs everything resident, with no plan
        self.vram_budget: float | None = None  # GiB
        # stage -> planner.StageCost, measured (calibrate); on a GPU the full-size networks' H200 costs
        self.stage_costs: dict = dict(_default_costs(self.device))
        self.probe = None  # runtime.memory.StagePeak: per-stage peaks recorded into Result.stage_peaks
        self.last_plan = None
        self._placements: dict = {}  # network -> residency.NetworkWeights
        self.stage_engines: dict = {}  # (stage, network) -> the Engine running it there (use_engines)
        self.host_store = None  # residency.HostWeightStore under a host budget (use_host_store)
        self._stage_flow = None
        self.conditioner = ImageConditioner(weights.dinov3, weights.naf)
        args = weights.pipeline_args
        self.shape_norm = {k: torch.tensor(args["shape_slat_normalization"][k], dtype=torch.float32) for k in ("mean", "std")}
        self.tex_norm = {k: torch.tensor(args["tex_slat_normalization"][k], dtype=torch.float32) for k in ("mean", "std")}
        if self.device.type == "cuda":
            self._warm_up_decoder_kernels()

    def _warm_up_decoder_kernels(self) -> dict:
        """Load the sparse-conv kernels while the models load, so the first decode pays no kernel
        loading (CUDA hash module; Triton tiles are compiled once per machine and then cached)."""
        from .kernels.subm_conv import warm_up_gpu_kernels
        from .models.sc_vae import SubMConv3d

        convs = [mod for key in ("shape_slat_decoder", "tex_slat_decoder") if key in self.models
                 for mod in self.models[key].modules() if isinstance(mod, SubMConv3d)]
        if not convs:
            return {}
        spent = warm_up_gpu_kernels(self.device, {(c.in_channels, c.out_channels) for c in convs}, dtype=convs[0].weight.dtype)
        # the fp32 LayerNorm kernel specialises per width and affine: compile those now too
        from .models.sc_vae import LayerNorm32

        t0 = time.perf_counter()
        norms = {(n.normalized_shape[0], n.weight is not None): n for key in ("shape_slat_decoder", "tex_slat_decoder")
                 if key in self.models for n in self.models[key].modules() if isinstance(n, LayerNorm32)}
        for (width, affine), norm in norms.items():
            # a stand-in of the same shape on the device: under a budget the decoders' own weights are on
            # the host (or not read yet)
            probe = LayerNorm32(width, elementwise_affine=affine, eps=norm.eps).to(self.device)
            probe(torch.zeros(2, width, device=self.device, dtype=convs[0].weight.dtype).normal_())
        torch.cuda.synchronize(self.device)
        spent["layer_norm_s"] = time.perf_counter() - t0
        return spent

    # ----------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_pretrained(cls, weights="TencentARC/Pixal3D", device=None, resolution: int = 1024, backend: str | None = None,
                        progress=None, vram_budget: float | str | None = None, host_budget: float | None = None) -> "Pipeline":
        """Load the official weights: a directory in the official layout or a Hugging Face id
        (downloaded on first use into the Hugging Face cache). Every file is checked before a tensor
        is read. device: "cuda" or "cpu" (default: cuda when available; the CPU runs fp32).
        resolution 512 loads only the networks a shape-only run needs. vram_budget: GiB of device
        memory every run must stay inside ("auto": the free memory less a margin; None: no plan,
        everything resident); with a number the weights stay on the host and move per stage.
        host_budget: GiB of host memory for the flow and decoder weights under a vram_budget: they are
        read from their (memory-mapped) files per stage, kept while they fit, re-read otherwise."""
        from .checkpoints import check_weights, locate_weights

        device = device or default_device()
        _note_idle_memory(device)
        say = as_progress(progress)
        t0 = time.perf_counter()
        need = None if resolution != 512 else set(k for k in _all_models() if k not in HIRES_ONLY)
        files = locate_weights(weights, need=need, progress=say)
        checked = check_weights(files, need)  # every file, before a tensor is read
        # CPU runs the fp32 oracle; on CUDA the networks keep upstream's bf16/fp16 torsos
        dtype = "float32" if str(device) == "cpu" else None
        # under a budget the weights load to the host (in the device's dtypes) and the plan moves them
        where = "cpu" if isinstance(vram_budget, (int, float)) and str(device) != "cpu" else device
        say.stage("load", f"{sum(r['bytes'] for r in checked) / 1e9:.2f} GB from {files.source} to {where}")
        stored = host_budget is not None and where == "cpu" and vram_budget is not None
        with _memory_budget("load"):
            w = load_weights(files, device=where, dtype=dtype, need=need, checked=checked, read=not stored,
                             progress=lambda key, nbytes, total: say.advance("load", nbytes, total))
        pipe = cls(w, device=device, backend=backend)
        pipe.vram_budget = vram_budget
        if stored:
            pipe.use_host_store(int(host_budget * 2**30), files)
        pipe.load_seconds = time.perf_counter() - t0
        say.stage_done("load", pipe.load_seconds)
        return pipe

    @classmethod
    def from_preset(cls, name: str, device=None, progress=None, backend: str | None = None,
                    vram_budget: float | str | None = None) -> "Pipeline":
        """An embedded preset (`tiny`: every network small with seeded random weights; a structural
        demo whose asset does not depict the image)."""
        from .presets import build_preset, preset_structure

        t0 = time.perf_counter()
        device = device or default_device()
        _note_idle_memory(device)
        w, geometry = build_preset(name, device=device)
        pipe = cls(w, device=device, geometry=geometry, preset=name, backend=backend)
        pipe.structure = preset_structure(name)
        pipe.vram_budget = vram_budget
        if name != "reference":
            pipe.stage_costs = {}  # the full-size costs do not describe small networks: calibrate
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, image, resolution: int = 1024, seed: int = 42, steps: int | None = None,
            fov_deg: float | None = None, progress=None, preprocess: bool = True, vram_budget: float | None = None) -> Result:
        """Image → decoded mesh and PBR voxels. `image`: a path, a PIL image or an HxWx3/4 uint8
        array (RGBA with the background removed, or RGB when rembg is installed). resolution 512 is
        shape only; 1024/1536 are cascades with texture. seed: noise drawn as upstream after
        manual_seed(seed). steps: per stage (default 12). fov_deg: the photo's horizontal FOV.
        progress: a progress.Progress or a callable taking one line. vram_budget: device memory
        (GiB) the run must stay inside (default: this pipeline's `vram_budget`; None: everything
        resident, no plan). Returns a Result."""
        if resolution not in (512, 1024, 1536):
            raise ValueError(f"resolution must be 512, 1024 or 1536, not {resolution}")
        if resolution != 512 and not all(k in self.models for k in HIRES_ONLY):
            raise BudgetError(f"resolution {resolution} needs the 1024 shape/texture models, which were not loaded")
        progress = as_progress(progress)
        budget = vram_budget if vram_budget is not None else self.vram_budget  # "auto": the device's free memory
        v = {"image": image, "resolution": resolution, "steps": steps, "preprocess": preprocess,
             "camera": self._camera(fov_deg), "generator": torch.Generator().manual_seed(seed),  # upstream: noise on the CPU
             "tokens": {}}
        sw = _Stopwatch(self.device, progress, self.probe)
        plan = self.plan(resolution, budget) if budget is not None else None
        self.last_plan = plan
        with _allocator_cap(self.device, budget if plan is not None and budget != "auto" else None) as cap:
            for st in stages_for(resolution):
                plan = self._run_stage(st, v, sw, plan, progress, cap)
                for name in st.frees:
                    v.pop(name, None)
                if plan is not None and st.name in ("upsample", "shape_decoder"):  # HR tokens / voxels known: plan the rest again
                    # plan.budget: a retry's tighter budget holds for the rest of the run
                    plan = self.plan(resolution, plan.budget / 2**30, v["tokens"], fixed={p.stage: p for p in plan.stages[:plan.stages.index(plan[st.name]) + 1]})
                    self.last_plan = plan
        self._release_placements()
        latents = {"shape_slat": v["shape_latent"]}
        if resolution != 512:
            latents["tex_slat"] = v["tex_latent"]
        vertices, faces = v["mesh"]
        voxel_coords, voxel_attrs = v.get("pbr_voxels", (None, None))
        small = self.preset == "tiny"  # the reference preset exports at full size
        defaults = {"texture_size": 256 if small else 2048, "decimation_target": 20_000 if small else 200_000,
                    "device": self.device if self.device.type == "cuda" else None}
        return Result(vertices.cpu(), faces.cpu(), voxel_coords, voxel_attrs, v["res"], sw.rows, v["tokens"], latents,
                      defaults, plan=plan, stage_peaks=sw.peaks)

    def _camera(self, fov_deg):
        from .conditioning import Camera

        fov = math.radians(fov_deg) if fov_deg is not None else C.DEFAULT_FOV_RAD
        return Camera.from_fov(fov, mesh_scale=C.MESH_SCALE)  # inference.py: distance from the FOV

    def _stage_detail(self, name: str, v: dict) -> str:
        g, t = self.geometry, v["tokens"]
        return {
            "dinov3_lr": f"{g.lr_image}px", "dinov3_hr": f"{g.hr_image}px",
            "ss_flow": f"{self.flows['sparse_structure_flow_model'].resolution ** 3} tokens",
            "shape_lr_cond": f"NAF {g.naf_target('shape_lr')}px + projection",
            "shape_lr_flow": f"{t.get('shape_lr_flow', 0)} tokens @{v.get('lr_grid', 0)}³",
            "shape_hr_cond": f"NAF {g.naf_target('shape_hr')}px + projection",
            "shape_hr_flow": f"{t.get('shape_hr_flow', 0)} tokens @{v.get('hr_grid', 0)}³",
            "tex_cond": f"NAF {g.naf_target('tex')}px + projection",
            "tex_flow": f"{t.get('tex_flow', 0)} tokens",
            "shape_decoder": f"@{v.get('res', 0)}³",
            "mesh_extraction": f"{t.get('voxels', 0):,} voxels",
        }.get(name, "")

    def _run_stage(self, st, v: dict, sw, plan, progress, cap_bytes=None):
        """One stage under its plan; out of memory inside it frees the stage, plans it again under a
        tighter budget and retries (at most twice). Returns the plan the run goes on with."""
        fn = getattr(self, "_stage_" + st.name)
        for attempt in range(MAX_OOM_RETRIES + 1):
            sp = plan[st.name] if plan is not None else None
            _make_room(self.device, cap_bytes, sp, plan.overhead if plan is not None else 0)
            try:
                with sw(st.name, self._stage_detail(st.name, v)), self._placed(st, sp), \
                        gather_chunk_bytes(sp.decoder_chunk_bytes if sp is not None else None):
                    fn(v, sp, progress)
                return plan
            except StageOutOfMemory as e:
                if plan is None or attempt == MAX_OOM_RETRIES:
                    raise
                tighter = plan.budget * OOM_RETRY_SHRINK
                # said before the stage is freed: a listener sees what the device held when it ran out
                progress.note(f"{st.name}: out of memory under the plan ({e}); planning it again inside "
                              f"{tighter / 2**30:.2f} GiB (retry {attempt + 1} of {MAX_OOM_RETRIES})")
                self._release_placements(everything=True)
                _free_device_cache(self.device)
                done = {p.stage: p for p in plan.stages[:plan.stages.index(sp)]}
                try:
                    plan = self.plan(v["resolution"], tighter / 2**30, v["tokens"], fixed=done)
                except BudgetError as no_plan:
                    raise BudgetError(f"{e}; and under a tighter budget {no_plan}") from None
                self.last_plan = plan

    # ---- the stages ------------------------------------------------------------------------

    def _stage_preprocess(self, v, sp, progress):
        from .preprocess import as_image, preprocess_image, to_tensor

        g = self.geometry
        img = as_image(v["image"])
        img = preprocess_image(img) if v["preprocess"] else img
        v["image_lr"] = to_tensor(img, g.lr_image).to(self.device)
        if v["resolution"] != 512:
            v["image_hr"] = to_tensor(img, g.hr_image).to(self.device)

    def _stage_dinov3_lr(self, v, sp, progress):
        v["features_lr"] = self.conditioner.encode(v["image_lr"])

    def _stage_dinov3_hr(self, v, sp, progress):
        v["features_hr"] = self.conditioner.encode(v["image_hr"])

    def _stage_ss_flow(self, v, sp, progress):
        cond, dev = self.conditioner, self.device
        flow = self._flow("sparse_structure_flow_model", sp)
        R = flow.resolution
        v["tokens"]["ss_flow"] = R ** 3
        proj = cond.project_dense(v["features_lr"], R, v["camera"], image_size=self.geometry.lr_image)
        c = {"global": v["features_lr"].global_tokens, "proj": proj}
        neg = {k: torch.zeros_like(t) for k, t in c.items()}
        noise = torch.randn(1, flow.in_channels, R, R, R, generator=v["generator"]).to(dev)
        v["ss_latent"] = self.sampler.sample(flow, noise, c, neg, **C.sampler_params("sparse_structure", self.w.pipeline_args, v["steps"]),
                                             progress=_sampler_progress(progress, "ss_flow"), batched_cfg=_batched(sp))
        del proj, c, neg
        self._release(flow)

    def _stage_ss_decoder(self, v, sp, progress):
        from .models.ss_decoder import occupancy_to_coords

        logits = self.models["sparse_structure_decoder"](v["ss_latent"])  # decoders cast to their own torso dtype
        lr_grid = logits.shape[-1] // 2  # upstream pools the 64³ occupancy to 32³
        coords = occupancy_to_coords(logits.float(), pool=True).to(self.device)
        del logits
        if self.structure is not None:
            coords = self.structure.occupancy(lr_grid, self.device)
        if coords.shape[0] == 0:
            raise InputImageError("the sparse-structure stage found no occupied voxel for this image")
        v["coords_lr"], v["lr_grid"] = coords, lr_grid
        v["tokens"]["shape_lr_flow"] = int(coords.shape[0])

    def _stage_shape_lr_cond(self, v, sp, progress):
        g = self.geometry
        naf = self.conditioner.naf_sampler(v["image_lr"], v["features_lr"], g.naf_target("shape_lr"))  # evaluated at the projected texels
        v["cond_lr"] = self._proj_cond(v["features_lr"], naf, v["coords_lr"], v["lr_grid"], v["camera"], g.lr_image, None)

    def _stage_shape_lr_flow(self, v, sp, progress):
        v["shape_latent_lr"] = self._sample_shape(self._flow("shape_slat_flow_model_512", sp), v["cond_lr"], v["coords_lr"],
                                                  v["generator"], v["steps"], progress, "shape_lr_flow", sp)
        if v["resolution"] == 512:
            v["shape_latent"], v["res"] = v["shape_latent_lr"], v["lr_grid"] * 16
            v["tokens"]["shape_latent"] = v["tokens"]["shape_lr_flow"]

    def _stage_upsample(self, v, sp, progress):
        from .models.sc_vae import quantize_hr_coords

        g, lr_grid, resolution = self.geometry, v["lr_grid"], v["resolution"]
        shape_dec = self._decoder("shape_slat_decoder", sp)
        r_dec = lr_grid * 16  # upstream: the literal 512
        shape_dec.set_resolution(r_dec)  # the grid the upsampled coordinates are at
        hr_coords = shape_dec.upsample(v["shape_latent_lr"], upsample_times=4)
        res = lr_grid * 16 * resolution // 512
        floor_res = lr_grid * 16 * 2  # 1024: no cap
        step = lr_grid * 4  # 128 at full size
        while True:
            hr_unique = quantize_hr_coords(hr_coords, r_dec, res // 16)
            if hr_unique.shape[0] < g.max_num_tokens or res <= floor_res:
                break
            res -= step
        v["coords_hr"], v["hr_grid"], v["res"] = hr_unique, res // 16, res
        v["tokens"]["shape_hr_flow"] = v["tokens"]["tex_flow"] = v["tokens"]["shape_latent"] = int(hr_unique.shape[0])

    def _stage_shape_hr_cond(self, v, sp, progress):
        g = self.geometry
        naf = self.conditioner.naf_sampler(v["image_hr"], v["features_hr"], g.naf_target("shape_hr"))
        v["cond_hr"] = self._proj_cond(v["features_hr"], naf, v["coords_hr"], v["hr_grid"], v["camera"], g.hr_image, None)

    def _stage_shape_hr_flow(self, v, sp, progress):
        v["shape_latent"] = self._sample_shape(self._flow("shape_slat_flow_model_1024", sp), v["cond_hr"], v["coords_hr"],
                                               v["generator"], v["steps"], progress, "shape_hr_flow", sp)

    def _stage_tex_cond(self, v, sp, progress):
        g = self.geometry
        naf = self.conditioner.naf_sampler(v["image_hr"], v["features_hr"], g.naf_target("tex"))
        v["cond_tex"] = self._proj_cond(v["features_hr"], naf, v["shape_latent"].coords, v["hr_grid"], v["camera"], g.hr_image, None)

    def _stage_tex_flow(self, v, sp, progress):
        v["tex_latent"] = self._sample_tex(self._flow("tex_slat_flow_model_1024", sp), v["cond_tex"], v["shape_latent"],
                                           v["generator"], v["steps"], progress, sp)

    def _stage_shape_decoder(self, v, sp, progress):
        shape_dec = self._decoder("shape_slat_decoder", sp)
        shape_dec.set_resolution(v["res"])
        v["decoder_cache"] = {}  # neighbour maps, reused by the texture decoder
        h, v["subdivisions"] = shape_dec(v["shape_latent"], return_subs=True, cache=v["decoder_cache"])
        v["mesh_fields"] = h
        v["tokens"]["voxels"] = int(h.coords.shape[0])

    def _stage_mesh_extraction(self, v, sp, progress):
        h = v["mesh_fields"]  # freed after the stage: a retry after running out of memory needs it again
        if self.structure is not None:
            h = self.structure.mesh_fields(h, v["res"])
        v["mesh"] = self.models["shape_slat_decoder"].extract_meshes(h)[0]  # batch of one
        if v["resolution"] == 512:
            v.pop("subdivisions", None), v.pop("decoder_cache", None)

    def _stage_tex_decoder(self, v, sp, progress):
        # reads its inputs (the stage table frees them after): a retry after running out of memory needs them again
        t = self._decoder("tex_slat_decoder", sp)(v["tex_latent"], guide_subs=v["subdivisions"], cache=v["decoder_cache"])
        v["pbr_voxels"] = (t.coords[:, 1:].int().cpu(), (t.feats.float() * 0.5 + 0.5).cpu())

    @staticmethod
    def _release(flow):
        """Free a backend's per-stage caches (proj products, graphs) once its stage is done."""
        if hasattr(flow, "reset"):
            flow.reset()

    # ----------------------------------------------------------------------------------------

    def _proj_cond(self, enc, naf_map, coords, grid, cam, image_size, dtype):
        proj = self.conditioner.project(coords, grid, cam, image_size=image_size, maps=(enc.patch_map, naf_map))
        c = {"global": enc.global_tokens, "proj": SparseTensor(proj, coords)}
        neg = {"global": torch.zeros_like(c["global"]), "proj": SparseTensor(torch.zeros_like(proj), coords)}
        return c, neg

    def _sample_shape(self, flow, cond, coords, gen, steps, progress, name, sp):
        c, neg = cond  # from _proj_cond
        noise = SparseTensor(torch.randn(coords.shape[0], flow.in_channels, generator=gen).to(self.device), coords)
        slat = self.sampler.sample(flow, noise, c, neg, **C.sampler_params("shape_slat", self.w.pipeline_args, steps),
                                   progress=_sampler_progress(progress, name), batched_cfg=_batched(sp))
        self._release(flow)
        n = self.shape_norm
        return slat.replace(slat.feats * n["std"].to(slat.feats) + n["mean"].to(slat.feats))

    def _sample_tex(self, flow, cond, shape_slat, gen, steps, progress, sp):
        coords = shape_slat.coords
        c, neg = cond  # from _proj_cond
        n = self.shape_norm
        shape_norm = shape_slat.replace((shape_slat.feats - n["mean"].to(shape_slat.feats)) / n["std"].to(shape_slat.feats))
        noise = shape_slat.replace(torch.randn(coords.shape[0], flow.in_channels - shape_slat.feats.shape[1], generator=gen).to(self.device))
        slat = self.sampler.sample(flow, noise, c, neg, concat_cond=shape_norm, **C.sampler_params("tex_slat", self.w.pipeline_args, steps),
                                   progress=_sampler_progress(progress, "tex_flow"), batched_cfg=_batched(sp))
        self._release(flow)
        t = self.tex_norm
        return slat.replace(slat.feats * t["std"].to(slat.feats) + t["mean"].to(slat.feats))

    # ----------------------------------------------------------------------------------------
    # plans: where the weights are and how each stage is chunked (runtime/planner.py)

    def network(self, name: str):
        """A network of the stage table by name: a pipeline model key, "dinov3" or "naf"."""
        if name == "dinov3":
            return self.w.dinov3
        if name == "naf":
            return self.w.naf
        return self.models[name]

    def memory_model(self):
        """The planner's model of this pipeline on its device: network sizes, measured stage costs,
        the device's non-torch overhead."""
        from .runtime.planner import NetworkSize

        model = memory_model_for(self.w, self.stage_costs, self.backend, device_overhead(self.device))
        for net, nw in self._placements.items():  # sizes as stored (a store's unread networks hold nothing yet)
            model.networks[net] = NetworkSize(nw.bytes(), nw.unit_bytes(), nw.rest_bytes(), len(nw.units))
        return model

    def calibrate(self, image, resolution: int = 1024, seed: int = 42, steps: int | None = None, **run_args) -> dict:
        """Measure, in one unbudgeted run on this device, each stage's carried bytes (values earlier
        stages left alive), transient bytes (its own allocations at their peak) and seconds, as the
        planner's stage costs (`stage_costs`, merged). On the CPU the bytes are counted by
        runtime.memory.LiveBytes. Returns the costs of this run."""
        from .runtime.memory import LiveBytes, StagePeak
        from .runtime.planner import fit_costs
        from .runtime.stages import BY_NAME

        tracker = LiveBytes() if self.device.type != "cuda" else None
        probe, saved = StagePeak(self.device, tracker), (self.probe, self.vram_budget)
        self.probe, self.vram_budget = probe, None
        try:
            with tracker if tracker is not None else contextlib.nullcontext():
                base = probe.live()
                r = self.run(image, resolution, seed=seed, steps=steps, **run_args)
        finally:
            self.probe, self.vram_budget = saved
        rows = [{"stage": p["stage"], "units": r.tokens.get(BY_NAME[p["stage"]].tokens, 0) if BY_NAME[p["stage"]].tokens else 0,
                 "carried": p["start"] - base, "transient": p["peak"] - p["start"], "seconds": p["seconds"]}
                for p in r.stage_peaks]
        costs = fit_costs([rows], source=f"calibrated on {device_name(self.device)}")
        self.stage_costs.update(costs)
        return costs

    def plan(self, resolution: int = 1024, vram_budget: float | None = None, tokens: dict | None = None, fixed: dict | None = None):
        """The plan for a run at `resolution` inside `vram_budget` GiB (None: the device's free
        memory less a margin). Raises BudgetError naming the smallest budget that fits when none does."""
        from .runtime.planner import GIB, PlanError

        budget = default_budget(self.device) if vram_budget in (None, "auto") else int(float(vram_budget) * GIB)
        try:
            return self.memory_model().plan(budget, resolution, tokens, fixed=fixed)
        except PlanError as e:
            raise BudgetError(f"{e}; the smallest budget that fits is {math.ceil(e.needed / GIB * 10) / 10:.1f} GiB "
                              f"(--vram-budget {math.ceil(e.needed / GIB * 10) / 10:.1f})") from None

    def _flow(self, key: str, sp):
        """The flow network as the sampler calls it under this stage plan."""
        from .runtime.planner import RESIDENT, STREAMED

        if self.backend != "cuda" or hasattr(self.flows[key], "engine"):
            return self.flows[key]  # eager or an engine: placed by _placed
        from .runtime.cuda_backend import BackendOptions, FlowBackend, wrap_flow

        mode = sp.weights.get(key, RESIDENT) if sp is not None else RESIDENT
        cache = BackendOptions.proj_cache_bytes if sp is None or sp.proj_cache else 0
        chunk = sp.token_chunk if sp is not None else None
        if mode == RESIDENT:
            flow = self.flows[key]
            if not isinstance(flow, FlowBackend):  # weights on the host: copied to the device once
                flow = self.flows[key] = wrap_flow(self.models[key], key, device=str(self.device))
            flow.opts.token_chunk, flow.opts.proj_cache_bytes = chunk, cache  # read at each forward
            return flow
        # built for this stage only: its device copies leave with it
        self._stage_flow = wrap_flow(self.models[key], key, device=str(self.device), graphs=sp.graphs, token_chunk=chunk,
                                     residency="streamed" if mode == STREAMED else "resident", proj_cache_bytes=cache,
                                     resident_blocks=sp.resident_units)
        return self._stage_flow

    def _decoder(self, key: str, sp):
        dec = self.models[key]  # its chunking is set around the stage (gather_chunk_bytes)
        if key == "shape_slat_decoder":
            dec.structure = self.structure  # the reference shape's subdivisions, when set
        return dec

    @contextlib.contextmanager
    def _placed(self, st, sp):
        """The stage's networks where its plan puts them, for the duration of the stage."""
        if sp is None:
            yield
            return
        from .runtime.residency import RESIDENT, NetworkWeights

        with contextlib.ExitStack() as stack:
            for net, mode in sp.weights.items():
                engine = self.stage_engines.get((st.name, net))
                if engine is not None:  # an engine takes and frees its own device memory (Engine.placed)
                    stack.enter_context(engine.placed(mode, sp.weight_bytes.get(net)))
                    continue
                if self.backend == "cuda" and net in self.flows:  # the backend makes its own device copies (_flow)
                    if self.host_store is not None and net in self.host_store.networks:
                        stack.enter_context(self.host_store.held(net))  # ... from the host copy, read if dropped
                    continue
                nw = self._placements.get(net)
                if nw is None and mode == RESIDENT and _on(self.network(net), self.device):
                    continue  # already where it computes (loaded there): nothing to move
                if nw is None:
                    nw = self._placements[net] = NetworkWeights(self.network(net), self.device)
                if self.host_store is not None and net in self.host_store.networks:
                    stack.enter_context(self.host_store.placed(net, mode))
                else:
                    stack.enter_context(nw.placed(mode))
            try:
                yield
            finally:
                flow, self._stage_flow = self._stage_flow, None
                if flow is not None:
                    flow.unload()  # its device copies go now, not when the garbage collector finds them

    def use_host_store(self, budget_bytes: int, files) -> None:
        """Keep the pipeline networks' host copies in a store under `budget_bytes`: read from their
        files on first use, the least recently used dropped and re-read when the budget is short."""
        from functools import partial

        from .checkpoints import read_network_file
        from .runtime.residency import HostWeightStore, NetworkWeights

        self.host_store = HostWeightStore(budget_bytes)
        for key, module in self.models.items():
            self._placements[key] = self.host_store.add(key, NetworkWeights(
                module, self.device, reader=partial(read_network_file, base=files.models[key]), host_loaded=False))

    def offload(self) -> None:
        """Every network's weights to host memory (pinned on CUDA), device copies freed: a budgeted
        run then places them per stage (a pipeline loaded resident, e.g. the benchmark's, before its
        budget runs)."""
        from .runtime.residency import NetworkWeights

        for flow in self.flows.values():
            if hasattr(flow, "unload"):
                flow.unload()
        for net in networks_for(1536):
            if net not in ("dinov3", "naf") and net not in self.models:
                continue
            nw = self._placements.get(net)
            if nw is None:
                self._placements[net] = NetworkWeights(self.network(net), self.device)
            else:
                nw.to_host()
        _free_device_cache(self.device)

    def _release_placements(self, everything: bool = False) -> None:
        """Drop stage-built backends; with `everything`, resident device copies too."""
        self._stage_flow = None
        if everything:
            for flow in self.flows.values():
                if hasattr(flow, "unload"):
                    flow.unload()  # a resident backend loads its copies again at its next call
            for nw in self._placements.values():
                nw.to_host()
            if self.host_store is None:
                self._placements.clear()

    # ----------------------------------------------------------------------------------------

    def export_glb(self, result: Result, path, texture_size: int | None = None, decimation_target: int | None = None, progress=None) -> dict:
        """Same as `result.save_glb(...)`."""
        return result.save_glb(path, texture_size=texture_size, decimation_target=decimation_target, progress=progress)


MAX_OOM_RETRIES = 2
OOM_RETRY_SHRINK = 0.8  # each retry plans inside this share of the previous budget
BUDGET_MARGIN = 512 << 20  # left free under the default budget (other processes, allocator slack)


def _default_costs(device) -> dict:
    if torch.device(device).type != "cuda":
        return {}
    from .runtime.stage_costs import H200_COSTS

    return H200_COSTS


def _on(module, device) -> bool:
    p = next(module.parameters(), None)
    return p is None or p.device == torch.device(device)


def _batched(sp) -> bool | None:
    """The sampler's batched_cfg for a stage plan (None: the model decides)."""
    return None if sp is None or sp.cfg_batched else False


def _free_device_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


EXPANDABLE_SEGMENTS_ENV = "PIXAL3D_EXPANDABLE_SEGMENTS"  # opt-in until a GPU run has compared it


def _set_expandable_segments(on: bool) -> None:
    setting = f"expandable_segments:{'True' if on else 'False'}"
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if set_settings is not None:
        set_settings(setting)
    else:
        torch.cuda.memory._set_allocator_settings(setting)


@contextlib.contextmanager
def _allocator_cap(device, budget_gib):
    """Torch's allocator capped at the budget less the non-torch overhead for a budgeted run: its
    cache of freed blocks would otherwise grow past the budget on a larger card (it empties the cache
    and retries at the cap instead). A tighter cap already set (a benchmark's) stays. Yields the cap
    in bytes (None: no cap). With PIXAL3D_EXPANDABLE_SEGMENTS=1 (and no explicit PYTORCH_CUDA_ALLOC_CONF
    choice) segments made under the cap are expandable: freed blocks between live ones are unmapped at
    the cap, where fixed segments ran decoders out of memory fragmented."""
    device = torch.device(device)
    if budget_gib is None or device.type != "cuda":
        yield None
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    before = float(torch.cuda.get_per_process_memory_fraction(index))
    fraction = float(max(0.0, min(before, (float(budget_gib) * 2**30 - device_overhead(device)) / total)))
    expandable = C.env_flag(EXPANDABLE_SEGMENTS_ENV) and "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    if expandable:
        _set_expandable_segments(True)
    try:
        yield int(fraction * total)
    finally:
        if expandable:
            _set_expandable_segments(False)
        torch.cuda.set_per_process_memory_fraction(before, index)


def cache_in_the_way(reserved: int, allocated: int, predicted_torch_peak: int, cap: int) -> bool:
    """Whether the allocator's cache (reserved but free) leaves a stage too little room under the
    cap for what the stage is predicted to allocate beyond what is allocated now."""
    return reserved + max(0, predicted_torch_peak - allocated) > cap


def _make_room(device, cap_bytes, sp, overhead: int) -> None:
    """Empty torch's cache of freed blocks before a stage whose predicted peak would run into the
    allocator's cap with it: the allocator would otherwise empty it mid-stage, synchronising, at each miss."""
    if cap_bytes is None or sp is None or not sp.predicted_peak:
        return
    if cache_in_the_way(torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device),
                        sp.predicted_peak - overhead, cap_bytes):
        torch.cuda.empty_cache()


def _note_idle_memory(device) -> None:
    """Read the device's used memory before this process's CUDA context exists (`device_overhead`
    subtracts it: what others hold is not this process's overhead)."""
    if torch.device(device).type == "cuda":
        from .runtime.memory import idle_device_used, nvml_index

        idle_device_used(nvml_index(device))


def device_overhead(device) -> int:
    """Device memory this process holds outside torch's allocator (CUDA context, libraries): what a
    budget loses before any tensor. 0 on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    from .runtime.memory import NvmlProbe, idle_device_used, nvml_index

    index = nvml_index(device)
    used = NvmlProbe(index).read()
    if used is None:  # no NVML: everything used on the device above idle counts against the budget
        free, total = torch.cuda.mem_get_info(device)
        used = total - free - idle_device_used(index)
    now = max(0, used - torch.cuda.memory_reserved(device))
    # the kernel images a run loads as it goes (our Triton kernels, cuBLAS's, the flows' graphs)
    # come on top of what is held before the first run
    first = _FIRST_OVERHEAD.setdefault(index, now)
    return max(now, first + KERNEL_IMAGES_BYTES)


_FIRST_OVERHEAD: dict = {}
KERNEL_IMAGES_BYTES = 192 << 20  # non-torch device memory a 1024 cascade's first run adds (H100: ~160 MB)


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_budget(device) -> int:
    """Bytes a run may use when no budget is given: the device's free memory plus what this process's
    allocator already holds, less a margin (CPU: the available host memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free + torch.cuda.memory_reserved(device) - BUDGET_MARGIN)
    return max(0, host_available_bytes() - BUDGET_MARGIN)


def host_available_bytes() -> int:
    """Host memory available to a new allocation (Linux: MemAvailable; elsewhere psutil)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


DEFAULT_OVERHEAD_GIB = 0.5  # CUDA context + cuBLAS/cuDNN handles, when no GPU is here to measure them


def calibration_image():
    """An RGBA image (a lit disc on transparency) for measuring stage costs when no input is at hand;
    the presets' structure does not depend on the image."""
    import numpy as np

    y, x = np.mgrid[:256, :256]
    r = np.hypot(x - 128, y - 128)
    img = np.zeros((256, 256, 4), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200 - r / 2, 120, 60 + r / 3
    img[..., 3] = np.where(r < 100, 255, 0)
    return img


def plan_offline(preset: str, resolution: int, vram_budget, backend: str = "cuda", tokens: int | None = None,
                 overhead_gib: float | None = None):
    """A plan without loading weights: the reference (official) networks built on the meta device with
    the H200 stage costs, or the tiny preset with its costs measured now on the CPU."""
    from .runtime.planner import GIB, PlanError

    if preset == "reference":
        from .reference_preset import build_reference

        w, _ = build_reference("meta")
        costs = _default_costs("cuda") if backend == "cuda" else {}
        overhead = overhead_gib if overhead_gib is not None else (
            device_overhead("cuda") / GIB if torch.cuda.is_available() else DEFAULT_OVERHEAD_GIB)
    else:
        pipe = Pipeline.from_preset(preset, device="cpu")
        pipe.calibrate(calibration_image(), resolution, steps=2)
        w, costs, backend = pipe.w, pipe.stage_costs, "eager"
        overhead = overhead_gib or 0.0
    model = memory_model_for(w, costs, backend, int(overhead * GIB))
    budget = default_budget("cuda" if torch.cuda.is_available() else "cpu") if vram_budget == "auto" else int(float(vram_budget) * GIB)
    try:
        return model.plan(budget, resolution, {"shape_hr_flow": tokens} if tokens else None)
    except PlanError as e:
        raise BudgetError(f"{e}; the smallest budget that fits is {math.ceil(e.needed / GIB * 10) / 10:.1f} GiB") from None


def memory_model_for(weights: Weights, costs: dict, backend: str, overhead: int):
    """A planner.MemoryModel of these networks (on any device, meta included)."""
    from .runtime.planner import MemoryModel, network_size

    modules = {"dinov3": weights.dinov3, "naf": weights.naf, **weights.models}
    nets = {n: network_size(modules[n]) for n in networks_for(1536) if n in modules}
    flow_knobs = backend == "cuda"
    return MemoryModel(nets, dict(costs), flow_shapes=_flow_shapes(weights.models) if flow_knobs else {},
                       overhead=overhead, flow_knobs=flow_knobs)


def _flow_shapes(models: dict) -> dict:
    """planner.FlowShape per flow stage: what the backend's knobs change (its projection cache, the
    row-local share of a row's activations) from the network's widths."""
    from .runtime.planner import FlowShape
    from .runtime.stages import STAGES

    out = {}
    for st in STAGES:
        if not st.sampled:
            continue
        m = models.get(st.networks[0])
        if m is None or getattr(m, "image_attn_mode", None) != "proj":
            continue
        C_, mlp = m.model_channels, m.blocks[0].mlp.mlp[0].out_features
        # per row: attention holds q, k, v and its output (4C); the row-local work the MLP hidden
        # layer, the residual and norms (mlp + 3C), which a token chunk bounds
        out[st.name] = FlowShape(len(m.blocks), C_, torch.finfo(m.dtype).bits // 8, (mlp + 3 * C_) / (mlp + 7 * C_))
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _all_models():
    from .checkpoints import PIPELINE_MODELS

    return PIPELINE_MODELS.keys()
