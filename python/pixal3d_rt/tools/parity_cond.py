"""Golden parity runners for image conditioning: na2d, NAF, DinoV3ProjFeatureExtractor.

Registered with pixal3d_rt.tools.parity; every dimension comes from the fixture itself.
"""
from __future__ import annotations

import torch

from pixal3d_rt.conditioning import Camera, ImageConditioner, dense_coords, normalise_uv, voxel_to_image
from pixal3d_rt.kernels.na2d import na2d, neighbour_window
from pixal3d_rt.models.dinov3 import build_dinov3
from pixal3d_rt.models.registry import build_model
from pixal3d_rt.tools.parity import Fixture, register


def _sub_state(w: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}


@register("na2d")
def run_na2d(fx: Fixture) -> dict:
    got = {}
    for i, case in enumerate(fx.config["args"]["cases"]):
        p = f"case{i}."
        q, k, v = fx.inp[p + "q"], fx.inp[p + "k"], fx.inp[p + "v"]
        ks, dil = fx.inp[p + "kernel_size"].tolist(), fx.inp[p + "dilation"].tolist()
        got[f"out.{p}out"] = na2d(q, k, v, ks, dil)
        got[f"mid.{p}window_x"] = neighbour_window(q.shape[1], ks[0], dil[0])
        got[f"mid.{p}window_y"] = neighbour_window(q.shape[2], ks[1], dil[1])
    return got


@register("NAF")
def run_naf(fx: Fixture) -> dict:
    model = build_model(fx.config).eval()
    model.load_state_dict(fx.w, strict=True)
    size = tuple(int(s) for s in fx.inp["output_size"].tolist())
    image, feats = fx.inp["image"], fx.inp["features"]
    hr = model(image, feats, size)
    queries, keys = model.queries_keys(image, feats.shape[-2:], size)
    return {"out.hr": hr, "mid.queries": queries, "mid.keys": keys}


def _projection_mids(tag: str, R: int, cam: Camera, S: int) -> dict:
    uv, depth = voxel_to_image(dense_coords(R), R, cam.fov, cam.distance, S, cam.mesh_scale)
    valid = (uv[:, 0] >= 0) & (uv[:, 0] < S) & (uv[:, 1] >= 0) & (uv[:, 1] < S) & (depth > 0)
    p = f"mid.{tag}."
    return {p + "points_2d": uv[None], p + "depth": depth[None], p + "valid_mask": valid[None], p + "grid_ndc": normalise_uv(uv, S)[None]}


@register("DinoV3ProjFeatureExtractor")
def run_proj_extractor(fx: Fixture) -> dict:
    cfg = fx.config
    args = cfg["args"]
    dino = build_dinov3(cfg["dino"])
    dino.load_state_dict(_sub_state(fx.w, "model."), strict=True)
    naf = None
    if args.get("use_naf_upsample"):
        naf = build_model(cfg["naf"]).eval()
        naf.load_state_dict(_sub_state(fx.w, "naf_model."), strict=True)
    cond = ImageConditioner(dino, naf)

    image = fx.inp["image"]
    S = int(args.get("image_size", 512))
    if tuple(image.shape[-2:]) != (S, S):
        raise ValueError(f"image {tuple(image.shape)} is not at the extractor size {S}")
    R = int(args.get("grid_resolution", 16))
    cam = Camera(fx.inp["camera_angle_x"].item(), fx.inp["distance"].item(), fx.inp["mesh_scale"].item())

    z_global, patch_map = cond.encode(image)
    maps = [patch_map]
    got = {"out.z_global": z_global}
    got.update(_projection_mids("project0", R, cam, S))
    if naf is not None:
        t = args.get("naf_target_size") or 128
        T = int(t if isinstance(t, int) else t[0])
        hr = cond.naf_map(image, patch_map, T)
        maps.append(hr)
        got["mid.naf_hr"] = hr
        got.update(_projection_mids("project1", R, cam, S))
    got["out.z_proj"] = cond.project_dense(maps, R, cam, S)

    if "coords" in fx.inp:  # Pixal3DImageTo3DPipeline.get_proj_cond_shape, on the sparse path
        coords = fx.inp["coords"]
        R_sparse = int(fx.inp["grid_resolution_override"]) if "grid_resolution_override" in fx.inp else R
        # the HR branch evaluates NAF only at the texels the projection touches
        sparse_maps = [patch_map] + ([cond.naf_sampler(image, patch_map, T)] if naf is not None else [])
        got["out.sparse.global"] = z_global
        got["out.sparse.proj.feats"] = cond.project(coords, R_sparse, cam, S, sparse_maps)
        got["out.sparse.proj.coords"] = coords
        got.update(_projection_mids("project100", R_sparse, cam, S))
        if naf is not None:
            got.update(_projection_mids("project101", R_sparse, cam, S))
    return got
