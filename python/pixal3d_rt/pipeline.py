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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import config as C
from .checkpoints import HIRES_ONLY, Weights, load_weights
from .errors import BudgetError, InputImageError
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
    def __init__(self, device, progress):
        self.device, self.progress, self.rows = device, progress, []

    def __call__(self, name: str, detail: str = ""):
        sw = self

        class _Span:
            def __enter__(self):
                sw.progress.stage(name, detail)
                self.t = time.perf_counter()
                return self

            def __exit__(self, *exc):
                oom = out_of_memory(exc[1], name) if exc[1] is not None else None
                if oom is not None:
                    raise oom from None
                if exc[0] is None:
                    if str(sw.device).startswith("cuda"):
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - self.t
                    sw.rows.append((name, seconds, detail))
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

            self.flows = {k: wrap_flow(m, k) for k, m in self.flows.items()}
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
        for (width, _), norm in norms.items():
            norm(torch.zeros(2, width, device=self.device, dtype=convs[0].weight.dtype).normal_())
        torch.cuda.synchronize(self.device)
        spent["layer_norm_s"] = time.perf_counter() - t0
        return spent

    # ----------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_pretrained(cls, weights="TencentARC/Pixal3D", device=None, resolution: int = 1024, backend: str | None = None,
                        progress=None) -> "Pipeline":
        """Load the official weights: a directory in the official layout or a Hugging Face id
        (downloaded on first use into the Hugging Face cache). Every file is checked before a tensor
        is read. device: "cuda" or "cpu" (default: cuda when available; the CPU runs fp32).
        resolution 512 loads only the networks a shape-only run needs."""
        from .checkpoints import check_weights, locate_weights

        device = device or default_device()
        say = as_progress(progress)
        t0 = time.perf_counter()
        need = None if resolution != 512 else set(k for k in _all_models() if k not in HIRES_ONLY)
        files = locate_weights(weights, need=need, progress=say)
        checked = check_weights(files, need)  # every file, before a tensor is read
        # CPU runs the fp32 oracle; on CUDA the networks keep upstream's bf16/fp16 torsos
        dtype = "float32" if str(device) == "cpu" else None
        say.stage("load", f"{sum(r['bytes'] for r in checked) / 1e9:.2f} GB from {files.source} to {device}")
        with _memory_budget("load"):
            w = load_weights(files, device=device, dtype=dtype, need=need, checked=checked,
                             progress=lambda key, nbytes, total: say.advance("load", nbytes, total))
        pipe = cls(w, device=device, backend=backend)
        pipe.load_seconds = time.perf_counter() - t0
        say.stage_done("load", pipe.load_seconds)
        return pipe

    @classmethod
    def from_preset(cls, name: str, device=None, progress=None, backend: str | None = None) -> "Pipeline":
        """An embedded preset (`tiny`: every network small with seeded random weights; a structural
        demo whose asset does not depict the image)."""
        from .presets import build_preset, preset_structure

        t0 = time.perf_counter()
        device = device or default_device()
        w, geometry = build_preset(name, device=device)
        pipe = cls(w, device=device, geometry=geometry, preset=name, backend=backend)
        pipe.structure = preset_structure(name)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, image, resolution: int = 1024, seed: int = 42, steps: int | None = None,
            fov_deg: float | None = None, progress=None, preprocess: bool = True) -> Result:
        """Image → decoded mesh and PBR voxels. `image`: a path, a PIL image or an HxWx3/4 uint8
        array (RGBA with the background removed, or RGB when rembg is installed). resolution 512 is
        shape only; 1024/1536 are cascades with texture. seed: noise drawn as upstream after
        manual_seed(seed). steps: per stage (default 12). fov_deg: the photo's horizontal FOV.
        progress: a progress.Progress or a callable taking one line. Returns a Result."""
        from .conditioning import Camera
        from .models.sc_vae import quantize_hr_coords
        from .models.ss_decoder import occupancy_to_coords
        from .preprocess import as_image, preprocess_image, to_tensor

        if resolution not in (512, 1024, 1536):
            raise ValueError(f"resolution must be 512, 1024 or 1536, not {resolution}")
        if resolution != 512 and not all(k in self.models for k in HIRES_ONLY):
            raise BudgetError(f"resolution {resolution} needs the 1024 shape/texture models, which were not loaded")
        dev, g, m, cond = self.device, self.geometry, self.models, self.conditioner
        progress = as_progress(progress)
        sw = _Stopwatch(dev, progress)
        fov = math.radians(fov_deg) if fov_deg is not None else C.DEFAULT_FOV_RAD
        cam = Camera.from_fov(fov, mesh_scale=C.MESH_SCALE)  # inference.py: distance from the FOV
        args = self.w.pipeline_args
        result_tokens = {}

        with sw("preprocess"):
            img = as_image(image)
            img = preprocess_image(img) if preprocess else img
            img_lr = to_tensor(img, g.lr_image).to(dev)
            img_hr = to_tensor(img, g.hr_image).to(dev) if resolution != 512 else None

        with sw("dinov3", f"{g.lr_image}px" + (f" + {g.hr_image}px" if img_hr is not None else "")):
            enc_lr = cond.encode(img_lr)
            enc_hr = cond.encode(img_hr) if img_hr is not None else None

        gen = torch.Generator().manual_seed(seed)  # upstream: torch.manual_seed(seed), noise drawn on the CPU

        # ---- stage 1: sparse structure --------------------------------------------------------
        ss_flow = self.flows["sparse_structure_flow_model"]
        R = ss_flow.resolution
        with sw("ss_flow", f"{R ** 3} tokens"):
            proj = cond.project_dense(enc_lr, R, cam, image_size=g.lr_image)
            c = {"global": enc_lr.global_tokens, "proj": proj}
            neg = {k: torch.zeros_like(v) for k, v in c.items()}
            noise = torch.randn(1, ss_flow.in_channels, R, R, R, generator=gen).to(dev)
            z = self.sampler.sample(ss_flow, noise, c, neg, **C.sampler_params("sparse_structure", args, steps),
                       progress=_sampler_progress(progress, "ss_flow"))
            del proj, c, neg
            self._release(ss_flow)
        with sw("ss_decoder"):
            logits = m["sparse_structure_decoder"](z)  # decoders cast to their own torso dtype
            lr_grid = logits.shape[-1] // 2  # upstream pools the 64³ occupancy to 32³
            coords = occupancy_to_coords(logits.float(), pool=True).to(dev)
            del logits
            if self.structure is not None:
                coords = self.structure.occupancy(lr_grid, dev)
        if coords.shape[0] == 0:
            raise InputImageError("the sparse-structure stage found no occupied voxel for this image")
        result_tokens["ss"] = R ** 3
        result_tokens["shape_lr"] = int(coords.shape[0])

        # ---- stage 2: shape at the LR grid ------------------------------------------------------
        with sw("shape_lr_cond", f"NAF {g.naf_target('shape_lr')}px + projection"):  # NAF is evaluated at the projected texels
            naf_lr = cond.naf_sampler(img_lr, enc_lr, g.naf_target("shape_lr"))
            c_lr = self._proj_cond(enc_lr, naf_lr, coords, lr_grid, cam, g.lr_image, None)
            del naf_lr
        with sw("shape_lr_flow", f"{coords.shape[0]} tokens @{lr_grid}³"):
            lr_slat = self._sample_shape(self.flows["shape_slat_flow_model_512"], c_lr, coords, gen, args, steps, progress,
                                         "shape_lr_flow")
            del c_lr

        shape_dec = m["shape_slat_decoder"]
        shape_dec.structure = self.structure
        if resolution == 512:
            res = lr_grid * 16
            shape_slat = lr_slat
        else:
            # ---- stage 3a: LR → HR token set ---------------------------------------------------
            with sw("upsample"):
                r_dec = lr_grid * 16  # upstream: the literal 512
                shape_dec.set_resolution(r_dec)  # the grid the upsampled coordinates are at
                hr_coords = shape_dec.upsample(lr_slat, upsample_times=4)
                res = lr_grid * 16 * resolution // 512
                floor_res = lr_grid * 16 * 2  # 1024: no cap
                step = lr_grid * 4  # 128 at full size
                while True:
                    hr_unique = quantize_hr_coords(hr_coords, r_dec, res // 16)
                    if hr_unique.shape[0] < g.max_num_tokens or res <= floor_res:
                        break
                    res -= step
                hr_grid = res // 16
                del hr_coords
            result_tokens["shape_hr"] = int(hr_unique.shape[0])
            # ---- stage 3b: shape at the HR grid -----------------------------------------------
            with sw("shape_hr_cond", f"NAF {g.naf_target('shape_hr')}px + projection"):
                naf_hr = cond.naf_sampler(img_hr, enc_hr, g.naf_target("shape_hr"))
                c_hr = self._proj_cond(enc_hr, naf_hr, hr_unique, hr_grid, cam, g.hr_image, None)
                del naf_hr
            with sw("shape_hr_flow", f"{hr_unique.shape[0]} tokens @{hr_grid}³"):
                shape_slat = self._sample_shape(self.flows["shape_slat_flow_model_1024"], c_hr, hr_unique, gen, args, steps,
                                                progress, "shape_hr_flow")
                del c_hr
            # ---- stage 4: texture -----------------------------------------------------------------
            with sw("tex_cond", f"NAF {g.naf_target('tex')}px + projection"):
                naf_tex = cond.naf_sampler(img_hr, enc_hr, g.naf_target("tex"))
                c_tex = self._proj_cond(enc_hr, naf_tex, shape_slat.coords, hr_grid, cam, g.hr_image, None)
                del naf_tex
            with sw("tex_flow", f"{shape_slat.coords.shape[0]} tokens"):
                tex_slat = self._sample_tex(self.flows["tex_slat_flow_model_1024"], c_tex, shape_slat, gen, args, steps, progress)
                del c_tex

        # ---- decode ---------------------------------------------------------------------------------
        with sw("shape_decoder", f"@{res}³"):
            shape_dec.set_resolution(res)
            dec_cache = {}
            h, subs = shape_dec(shape_slat, return_subs=True, cache=dec_cache)  # cache: neighbour maps reused below
            result_tokens["voxels"] = int(h.coords.shape[0])
        with sw("mesh_extraction", f"{h.coords.shape[0]:,} voxels"):
            if self.structure is not None:
                h = self.structure.mesh_fields(h, res)
            vertices, faces = shape_dec.extract_meshes(h)[0]  # batch of one
            del h
        voxel_coords = voxel_attrs = None
        if resolution != 512:
            with sw("tex_decoder"):
                tex_dec = m["tex_slat_decoder"]
                t = tex_dec(tex_slat, guide_subs=subs, cache=dec_cache)
                voxel_coords = t.coords[:, 1:].int().cpu()
                voxel_attrs = (t.feats.float() * 0.5 + 0.5).cpu()
                del t
        del subs, dec_cache
        latents = {"shape_slat": shape_slat}
        if resolution != 512:
            latents["tex_slat"] = tex_slat
        small = self.preset is not None
        defaults = {"texture_size": 256 if small else 2048, "decimation_target": 20_000 if small else 200_000,
                    "device": self.device if self.device.type == "cuda" else None}
        return Result(vertices.cpu(), faces.cpu(), voxel_coords, voxel_attrs, res, sw.rows, result_tokens, latents, defaults)

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

    def _sample_shape(self, flow, cond, coords, gen, args, steps, progress, name):
        c, neg = cond  # from _proj_cond
        noise = SparseTensor(torch.randn(coords.shape[0], flow.in_channels, generator=gen).to(self.device), coords)
        slat = self.sampler.sample(flow, noise, c, neg, **C.sampler_params("shape_slat", args, steps), progress=_sampler_progress(progress, name))
        self._release(flow)
        n = self.shape_norm
        return slat.replace(slat.feats * n["std"].to(slat.feats) + n["mean"].to(slat.feats))

    def _sample_tex(self, flow, cond, shape_slat, gen, args, steps, progress):
        coords = shape_slat.coords
        c, neg = cond  # from _proj_cond
        n = self.shape_norm
        shape_norm = shape_slat.replace((shape_slat.feats - n["mean"].to(shape_slat.feats)) / n["std"].to(shape_slat.feats))
        noise = shape_slat.replace(torch.randn(coords.shape[0], flow.in_channels - shape_slat.feats.shape[1], generator=gen).to(self.device))
        slat = self.sampler.sample(flow, noise, c, neg, concat_cond=shape_norm, **C.sampler_params("tex_slat", args, steps),
                      progress=_sampler_progress(progress, "tex_flow"))
        self._release(flow)
        t = self.tex_norm
        return slat.replace(slat.feats * t["std"].to(slat.feats) + t["mean"].to(slat.feats))

    # ----------------------------------------------------------------------------------------

    def export_glb(self, result: Result, path, texture_size: int | None = None, decimation_target: int | None = None, progress=None) -> dict:
        """Same as `result.save_glb(...)`."""
        return result.save_glb(path, texture_size=texture_size, decimation_target=decimation_target, progress=progress)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _all_models():
    from .checkpoints import PIPELINE_MODELS

    return PIPELINE_MODELS.keys()
