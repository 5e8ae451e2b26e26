"""Seam fill against OpenCV's TELEA inpainting (what upstream's to_glb runs), on a baked atlas.

Bakes the reference mug (python/pixal3d_rt/reference_shape.py) at grid 128 into a 512² atlas without
filling, fills the uncovered texels with cv2.inpaint(..., 3, INPAINT_TELEA) and with
bake.fill_uncovered (and with push-pull alone, dilate=0, for scale), and reports the mean absolute
difference in 8-bit units by distance from the nearest baked texel. Needs opencv-python-headless and
scipy, which pixal3d-rt does not depend on: `pip install opencv-python-headless` for this script only.

    python benchmarks/compare_fill_telea.py [--out benchmarks/results/fill_telea_cpu.json] [--png side_by_side.png]
"""
import argparse
import json
import time

import numpy as np
import torch


def main():
    import cv2
    from scipy import ndimage

    from pixal3d_rt.mesh import glb
    from pixal3d_rt.mesh.bake import bake_texture, fill_uncovered
    from pixal3d_rt.mesh.uv import uv_unwrap
    from pixal3d_rt.reference_shape import ReferenceStructure

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/fill_telea_cpu.json")
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    grid, size = 128, 512
    rs = ReferenceStructure()
    v, f = rs.surface_mesh(grid)
    coords = rs.voxels(grid).long()
    c = (coords.float() + 0.5) / grid - 0.5
    attrs = torch.cat([0.5 + 0.5 * torch.sin(9 * c + torch.tensor([0, 1.0, 2.0])), torch.ones(len(c), 3)], 1)
    pv, pf, _ = glb.prepare_mesh(v, f, decimation_target=20000)
    vm, fu, uv = uv_unwrap(pv, pf, texture_size=size)
    maps, mask = bake_texture(torch.from_numpy(pv[vm]), torch.from_numpy(fu), torch.from_numpy(uv), coords, attrs,
                              grid, size, fill=False)
    m = mask.numpy()
    rgb = maps[..., :3]
    img = np.clip(rgb.numpy() * 255, 0, 255).astype(np.uint8)
    t = time.perf_counter()
    telea = cv2.inpaint(img, (~m).astype(np.uint8), 3, cv2.INPAINT_TELEA).astype(np.float32)
    t_telea = time.perf_counter() - t
    dist = ndimage.distance_transform_edt(~m)
    bands = [(0, 1.5), (1.5, 3.5), (3.5, 8.5), (8.5, float("inf"))]
    res = {"grid": grid, "texture_size": size, "coverage": float(m.mean()), "cv2_version": cv2.__version__,
           "units": "mean |ours - TELEA| in 8-bit levels, by distance (texels) from the nearest baked texel",
           "telea_seconds": t_telea, "variants": {}}
    outs = {}
    for name, kw in (("fill_uncovered", {}), ("push_pull_only", {"dilate": 0})):
        t = time.perf_counter()
        out = fill_uncovered(rgb, mask, **kw).numpy()
        sec = time.perf_counter() - t
        q = np.clip(out * 255, 0, 255).astype(np.uint8).astype(np.float32)
        outs[name] = q
        res["variants"][name] = {"seconds": sec, **{f"{lo:g}-{hi:g}": round(float(np.abs(q - telea)[(dist > lo) & (dist <= hi)].mean()), 2)
                                                    for lo, hi in bands}}
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    if a.png:
        from PIL import Image

        Image.fromarray(np.concatenate([telea, outs["fill_uncovered"]], 1).astype(np.uint8)).save(a.png)


if __name__ == "__main__":
    main()
