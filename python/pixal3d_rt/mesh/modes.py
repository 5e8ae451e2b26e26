"""Export modes: named sets of `build_asset` / `export_glb` settings.

  upstream  what Pixal3D's inference.py exports: to_glb(decimation_target=1000000, texture_size=4096,
            remesh=True, remesh_band=1, remesh_project=0), webp textures, single-sided (the remeshed
            surface is closed and oriented), texels re-projected onto the decoded surface;
  fast      the default: the decoded surface cleaned, hole-filled and simplified (upstream's
            remesh=False branch), texels sampled where they land on the simplified surface, PNG;
            face count and texture size from the pipeline's defaults (200k, 2048; tiny preset 20k,
            256). Chosen by measurement (README, Export): re-projecting every texel costs far more
            than the rest of the export on a CPU, and the simplified surface stays within the voxels.
Explicit settings (decimation target, texture size, format, ...) override the mode's.
"""
from __future__ import annotations

EXPORT_MODES: dict[str, dict] = {
    "fast": {"remesh": False, "project_texels": False, "image_format": "png"},
    "upstream": {"remesh": True, "remesh_band": 1.0, "remesh_project": 0.0, "decimation_target": 1_000_000,
                 "texture_size": 4096, "image_format": "webp", "double_sided": False, "project_texels": True},
}
DEFAULT_MODE = "fast"


def export_settings(mode: str | None, defaults: dict, **explicit) -> dict:
    """Settings for `export_glb`: the pipeline's defaults, then the mode's, then every explicit
    setting that is not None. `texture_format` is accepted as the name of `image_format`."""
    name = mode or DEFAULT_MODE
    if name not in EXPORT_MODES:
        raise ValueError(f"unknown export mode {name!r}; choose one of {', '.join(EXPORT_MODES)}")
    if "texture_format" in explicit:
        fmt = explicit.pop("texture_format")
        explicit.setdefault("image_format", fmt)
        if explicit["image_format"] is None:
            explicit["image_format"] = fmt
    out = {k: v for k, v in defaults.items() if v is not None}
    out.update(EXPORT_MODES[name])
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out
