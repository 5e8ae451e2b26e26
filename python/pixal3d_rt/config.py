"""Pipeline settings that are not network weights: sampler parameters, stage geometry, camera; and
the one reader of on/off switches from the environment (`env_flag`).

Values are upstream's: `pipeline.json` guidance intervals plus the overrides that Pixal3D's
`inference.py` passes to `run()` (pixal3d.md §4.1). The sampler settings read from a weights
directory's pipeline.json are used where present, and inference.py's overrides are applied on top,
exactly as upstream's entry point does.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass


def env_flag(var: str, default: bool = False) -> bool:
    """A switch from the environment: unset or "" gives `default`; 0, false, no, off turn it off;
    anything else turns it on."""
    value = os.environ.get(var, "").strip().lower()
    if value == "":
        return default
    return value not in ("0", "false", "no", "off")


# inference.py's overrides of pipeline.json (all stages 12 steps)
SAMPLER_OVERRIDES = {
    "sparse_structure": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7, "rescale_t": 5.0},
    "shape_slat": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.5, "rescale_t": 3.0},
    "tex_slat": {"steps": 12, "guidance_strength": 1.0, "guidance_rescale": 0.0, "rescale_t": 3.0},
}
# pipeline.json guidance intervals (texture [0.6, 0.9]: measured from a reference dump, pixal3d.md U1)
GUIDANCE_INTERVALS = {"sparse_structure": [0.6, 1.0], "shape_slat": [0.6, 1.0], "tex_slat": [0.6, 0.9]}
SIGMA_MIN = 1e-5

# Blender's default 50 mm lens on a 36 mm sensor: upstream's default camera_angle_x when no FOV is given
DEFAULT_FOV_RAD = 0.8575560450553894
DEFAULT_FOV_DEG = math.degrees(DEFAULT_FOV_RAD)  # 49.13°
MESH_SCALE = 1.0
MAX_NUM_TOKENS = 49152  # 1536 cascade cap (upstream run())


def sampler_params(stage: str, pipeline_args: dict | None = None, steps: int | None = None) -> dict:
    """Sampler parameters of a stage: pipeline.json params, then inference.py overrides, then --steps."""
    key = {"sparse_structure": "sparse_structure_sampler", "shape_slat": "shape_slat_sampler", "tex_slat": "tex_slat_sampler"}[stage]
    params = {"guidance_interval": list(GUIDANCE_INTERVALS[stage])}
    if pipeline_args and isinstance(pipeline_args.get(key), dict):
        params.update(pipeline_args[key].get("params", {}))
    params.update(SAMPLER_OVERRIDES[stage])
    if steps is not None:
        params["steps"] = int(steps)
    return params


@dataclass(frozen=True)
class Geometry:
    """Image sizes and the token cap of the cascade; full size is upstream's, `tiny` scales it down.
    Grids follow the networks: the SS decoder output pooled ×2 is the LR grid (32), `--resolution R`
    means an HR grid of LR·R/512 (64 / 96) and an output resolution of 16× the grid."""

    lr_image: int = 512  # DINOv3 input of the SS and LR-shape stages (NAF target T of both shape stages)
    hr_image: int = 1024  # DINOv3 input of the HR-shape and texture stages (NAF target T of the texture stage)
    max_num_tokens: int = MAX_NUM_TOKENS  # 1536 cascade: lower the resolution until N_HR is below this

    def naf_target(self, stage: str) -> int:
        # pixal3d.md §1.1: shape_512 T=512 (dilation 16), shape_1024 T=512 (dilation 8), tex_1024 T=1024 (dilation 16)
        return {"shape_lr": self.lr_image, "shape_hr": self.lr_image, "tex": self.hr_image}[stage]


FULL = Geometry()
