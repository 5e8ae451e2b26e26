"""The pipeline as a table of stages: the one list of stage names used by the pipeline, the planner,
timings, token counts, export specs and the benchmark.

Each stage names the networks it runs (pipeline model keys, plus "dinov3" and "naf"), the values it
reads and writes, and the values it frees once done. `tokens` names the count its activations scale
with, a key of `Result.tokens`: a flow stage's own name (its token count), "shape_latent" for the
upsampling (the latent it reads), "voxels" for the decoders and the mesh extraction (the decoded
voxels: their work follows the output grid, not the latent). `cascade` marks the stages that only run
at 1024/1536 (512 is shape only).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    networks: tuple = ()
    inputs: tuple = ()
    outputs: tuple = ()
    frees: tuple = ()
    tokens: str | None = None  # which count its activations scale with
    cascade: bool = False  # only at 1024 / 1536
    sampled: bool = False  # a flow stage: runs `steps` times (twice per step under CFG)


STAGES = (
    Stage("preprocess", inputs=("image",), outputs=("image_lr", "image_hr")),
    Stage("dinov3_lr", ("dinov3",), ("image_lr",), ("features_lr",)),
    Stage("dinov3_hr", ("dinov3",), ("image_hr",), ("features_hr",), cascade=True),
    Stage("ss_flow", ("sparse_structure_flow_model",), ("features_lr",), ("ss_latent",), tokens="ss_flow", sampled=True),
    Stage("ss_decoder", ("sparse_structure_decoder",), ("ss_latent",), ("coords_lr",), frees=("ss_latent",),
          tokens="ss_flow"),
    Stage("shape_lr_cond", ("naf",), ("image_lr", "features_lr", "coords_lr"), ("cond_lr",), tokens="shape_lr_flow"),
    Stage("shape_lr_flow", ("shape_slat_flow_model_512",), ("cond_lr", "coords_lr"), ("shape_latent_lr",),
          frees=("cond_lr",), tokens="shape_lr_flow", sampled=True),
    Stage("upsample", ("shape_slat_decoder",), ("shape_latent_lr",), ("coords_hr",), tokens="shape_lr_flow", cascade=True),
    Stage("shape_hr_cond", ("naf",), ("image_hr", "features_hr", "coords_hr"), ("cond_hr",), tokens="shape_hr_flow",
          cascade=True),
    Stage("shape_hr_flow", ("shape_slat_flow_model_1024",), ("cond_hr", "coords_hr"), ("shape_latent",),
          frees=("cond_hr", "shape_latent_lr"), tokens="shape_hr_flow", cascade=True, sampled=True),
    Stage("tex_cond", ("naf",), ("image_hr", "features_hr", "shape_latent"), ("cond_tex",),
          frees=("image_hr", "features_hr"), tokens="tex_flow", cascade=True),
    Stage("tex_flow", ("tex_slat_flow_model_1024",), ("cond_tex", "shape_latent"), ("tex_latent",),
          frees=("cond_tex",), tokens="tex_flow", cascade=True, sampled=True),
    Stage("shape_decoder", ("shape_slat_decoder",), ("shape_latent",), ("mesh_fields", "subdivisions", "decoder_cache"),
          tokens="voxels"),
    Stage("mesh_extraction", (), ("mesh_fields",), ("mesh",), frees=("mesh_fields",), tokens="voxels"),
    Stage("tex_decoder", ("tex_slat_decoder",), ("tex_latent", "subdivisions", "decoder_cache"), ("pbr_voxels",),
          frees=("subdivisions", "decoder_cache"), tokens="voxels", cascade=True),
    Stage("glb_export", (), ("mesh", "pbr_voxels"), ("glb",), tokens="voxels"),
)
BY_NAME = {s.name: s for s in STAGES}
STAGE_NAMES = tuple(BY_NAME)
# the stages `Pipeline.run` executes (the GLB is written by `Result.save_glb`)
RUN_STAGES = tuple(n for n in STAGE_NAMES if n != "glb_export")


def stages_for(resolution: int, *, with_glb: bool = False) -> list[Stage]:
    """The stages a run at this resolution executes, in order."""
    return [s for s in STAGES if (resolution != 512 or not s.cascade) and (with_glb or s.name != "glb_export")]


def networks_for(resolution: int) -> list[str]:
    """Every network the run at this resolution needs, in first-use order."""
    seen: dict = {}
    for s in stages_for(resolution):
        for n in s.networks:
            seen.setdefault(n, None)
    return list(seen)


def last_use(resolution: int) -> dict:
    """network -> name of the last stage that runs it (after which it can leave the device)."""
    out = {}
    for s in stages_for(resolution):
        for n in s.networks:
            out[n] = s.name
    return out
