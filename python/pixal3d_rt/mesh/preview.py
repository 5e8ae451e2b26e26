"""Preview renders of a written GLB: a few orthographic views in one PNG, with a small torch
rasteriser (no OpenGL, no display): z-buffer per pixel, base colour from the texture (nearest texel),
Lambert shading from a light behind the viewer, white background.

`render_views(path)` returns the images; `write_preview(glb_path, png_path)` writes them side by side.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .glb import quantize_unorm8  # the one float -> 8-bit rule

# yaw about the up axis (GLB +Y), degrees: the front (the photo's side faces -Z), right, back, left
VIEW_YAWS = (0.0, 90.0, 180.0, 270.0)
ELEVATION = 20.0


def _load(path):
    import trimesh

    scene = trimesh.load(str(path), force="scene")
    meshes = [g for g in scene.dump() if isinstance(g, trimesh.Trimesh)] if scene.geometry else []
    return meshes


def _rasterize(p: torch.Tensor, faces: torch.Tensor, size: int, chunk: int = 1 << 22):
    """p [V,3] in pixel units (x right, y down, z towards the viewer); returns (face [S,S] int64 -1
    where empty, bary [S,S,3]). The nearest surface wins (largest z)."""
    S = size
    face_id = torch.full((S * S,), -1, dtype=torch.int64)
    bary = torch.zeros((S * S, 3))
    zbuf = torch.full((S * S,), -math.inf)
    t = p[faces]  # [F,3,3]
    lo = torch.ceil(t[..., :2].amin(1) - 0.5).clamp(0, S - 1).long()
    hi = torch.floor(t[..., :2].amax(1) - 0.5).clamp(-1, S - 1).long()
    w = (hi[:, 0] - lo[:, 0] + 1).clamp_min(0)
    h = (hi[:, 1] - lo[:, 1] + 1).clamp_min(0)
    n = w * h
    e1, e2 = t[:, 1, :2] - t[:, 0, :2], t[:, 2, :2] - t[:, 0, :2]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    keep = torch.nonzero((n > 0) & (det.abs() > 1e-12)).squeeze(1)
    if keep.numel() == 0:
        return face_id.view(S, S), bary.view(S, S, 3)
    n, lo, w, t, e1, e2, det = n[keep], lo[keep], w[keep], t[keep], e1[keep], e2[keep], det[keep]
    start = torch.cumsum(n, 0) - n
    total = int(n.sum())
    for a in range(0, total, chunk):
        idx = torch.arange(a, min(a + chunk, total))
        k = torch.searchsorted(start, idx, right=True) - 1
        local = idx - start[k]
        x = lo[k, 0] + local % w[k]
        y = lo[k, 1] + local // w[k]
        dx = x.float() + 0.5 - t[k, 0, 0]
        dy = y.float() + 0.5 - t[k, 0, 1]
        b1 = (dx * e2[k, 1] - dy * e2[k, 0]) / det[k]
        b2 = (dy * e1[k, 0] - dx * e1[k, 1]) / det[k]
        b0 = 1 - b1 - b2
        inside = (b0 >= 0) & (b1 >= 0) & (b2 >= 0)
        if not inside.any():
            continue
        sel = torch.nonzero(inside).squeeze(1)
        k, px = k[sel], (y * S + x)[sel]
        bc = torch.stack([b0, b1, b2], 1)[sel]
        z = (bc * t[k, :, 2]).sum(1)
        zbuf.scatter_reduce_(0, px, z, "amax")
        win = z >= zbuf[px]
        face_id[px[win]] = keep[k[win]]
        bary[px[win]] = bc[win]
    return face_id.view(S, S), bary.view(S, S, 3)


def render_views(path, size: int = 384, yaws=VIEW_YAWS, elevation: float = ELEVATION) -> list[np.ndarray]:
    """RGB uint8 images [size, size, 3] of the GLB at `path`, one per yaw (degrees about +Y)."""
    meshes = _load(path)
    images = []
    if not meshes:
        return [np.full((size, size, 3), 255, np.uint8) for _ in yaws]
    verts = [torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32) for m in meshes]
    allv = torch.cat(verts)
    centre = (allv.amax(0) + allv.amin(0)) / 2
    radius = float((allv - centre).norm(dim=1).max()) or 1.0
    for yaw in yaws:
        a, e = math.radians(yaw), math.radians(elevation)
        ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        rx = torch.tensor([[1, 0, 0], [0, math.cos(e), math.sin(e)], [0, -math.sin(e), math.cos(e)]])  # look down
        rot = rx @ ry
        img = torch.ones((size, size, 3))
        zbest = torch.full((size, size), -math.inf)
        for m, v in zip(meshes, verts):
            # camera on the -Z side looking at the front: view z = -(rotated z)
            q = (v - centre) @ rot.T
            p = torch.stack([(q[:, 0] / radius * 0.95 + 1) * size / 2 * -1 + size,  # GLB +X is image left
                             (1 - q[:, 1] / radius * 0.95) * size / 2, -q[:, 2]], 1)
            f = torch.as_tensor(np.asarray(m.faces), dtype=torch.int64)
            fid, bc = _rasterize(p, f, size)
            hit = fid >= 0
            if not hit.any():
                continue
            tri = q[f[fid[hit]]]
            nrm = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
            nrm = nrm / nrm.norm(dim=1, keepdim=True).clamp_min(1e-12)
            shade = 0.35 + 0.65 * (-nrm[:, 2]).abs()  # light from the camera; either side lit
            colour = torch.full((int(hit.sum()), 3), 0.8)
            uv = getattr(m.visual, "uv", None)
            tex = getattr(getattr(m.visual, "material", None), "baseColorTexture", None)
            if uv is not None and tex is not None:
                t_img = torch.from_numpy(np.array(tex.convert("RGB"), dtype=np.float32)) / 255
                uvt = torch.as_tensor(np.asarray(uv), dtype=torch.float32)[f[fid[hit]]]
                uvp = (bc[hit][:, :, None] * uvt).sum(1)
                th, tw = t_img.shape[:2]
                col = (uvp[:, 0] * tw).long().clamp(0, tw - 1)
                row = ((1 - uvp[:, 1]) * th).long().clamp(0, th - 1)  # trimesh keeps uv with v up
                colour = t_img[row, col]
            z = (bc[hit] * p[f[fid[hit]]][:, :, 2]).sum(1)
            closer = z > zbest[hit]
            rows = torch.nonzero(hit)
            r, c = rows[closer, 0], rows[closer, 1]
            img[r, c] = (colour * shade[:, None])[closer]
            zbest[r, c] = z[closer]
        images.append(quantize_unorm8(img))
    return images


def write_preview(glb_path, png_path, size: int = 384) -> list:
    """The views of `render_views` side by side in one PNG at `png_path`. Returns the images."""
    from PIL import Image

    views = render_views(glb_path, size=size)
    Image.fromarray(np.concatenate(views, axis=1)).save(str(png_path))
    return views
