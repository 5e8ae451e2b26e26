"""Nearest triangle of every query point among the triangles of its 27 grid cells (Triton).

The same answer as the torch path of `mesh/project.closest_points` (its candidate pairs, its
bounding-sphere filter, Ericson's closest point in fp32, the first pair reaching the minimum wins),
without materialising the pairs: one program walks the 27 cell ranges of BLOCK queries and keeps
the best triangle in registers. The torch path builds, filters and reduces [pairs] arrays, several
times the queries; this reads each candidate triangle once per query.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import env_flag

DISABLE_ENV = "PIXAL3D_DISABLE_TRITON_CLOSEST"
BLOCK = 128
_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, the torch path's guard


def enabled() -> bool:
    return not env_flag(DISABLE_ENV)


@triton.jit
def _safe_div(n, d):
    return n / tl.where(tl.abs(d) > 1.1754943508222875e-38, d, 1.1754943508222875e-38)


@triton.jit
def _edge(px, py, pz, ix, iy, iz, jx, jy, jz):
    """closest point of segment i-j: (parameter s along it, squared distance)"""
    ex, ey, ez = jx - ix, jy - iy, jz - iz
    s = _safe_div((px - ix) * ex + (py - iy) * ey + (pz - iz) * ez, ex * ex + ey * ey + ez * ez)
    s = tl.minimum(tl.maximum(s, 0.0), 1.0)
    qx, qy, qz = px - ix - s * ex, py - iy - s * ey, pz - iz - s * ez
    return s, qx * qx + qy * qy + qz * qz


@triton.jit
def _closest_kernel(pts_ptr, start_ptr, end_ptr, tris_ptr, corners_ptr, sphere_ptr,
                    dist_ptr, face_ptr, bary_ptr, P, reach,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < P
    px = tl.load(pts_ptr + offs * 3 + 0, mask=live, other=0.0)
    py = tl.load(pts_ptr + offs * 3 + 1, mask=live, other=0.0)
    pz = tl.load(pts_ptr + offs * 3 + 2, mask=live, other=0.0)
    best = tl.full([BLOCK], float("inf"), tl.float32)
    best_face = tl.full([BLOCK], -1, tl.int64)
    best_v = tl.zeros([BLOCK], tl.float32)
    best_w = tl.zeros([BLOCK], tl.float32)
    for c in range(27):
        s0 = tl.load(start_ptr + offs * 27 + c, mask=live, other=0)
        n = tl.load(end_ptr + offs * 27 + c, mask=live, other=0) - s0
        for j in range(0, tl.max(n, axis=0)):
            m = live & (j < n)
            t = tl.load(tris_ptr + s0 + j, mask=m, other=0)
            cx = tl.load(sphere_ptr + t * 4 + 0, mask=m, other=0.0) - px
            cy = tl.load(sphere_ptr + t * 4 + 1, mask=m, other=0.0) - py
            cz = tl.load(sphere_ptr + t * 4 + 2, mask=m, other=0.0) - pz
            rr = tl.load(sphere_ptr + t * 4 + 3, mask=m, other=0.0) + reach
            m = m & (cx * cx + cy * cy + cz * cz <= rr * rr)
            ax = tl.load(corners_ptr + t * 9 + 0, mask=m, other=0.0)
            ay = tl.load(corners_ptr + t * 9 + 1, mask=m, other=0.0)
            az = tl.load(corners_ptr + t * 9 + 2, mask=m, other=0.0)
            bx = tl.load(corners_ptr + t * 9 + 3, mask=m, other=0.0)
            by = tl.load(corners_ptr + t * 9 + 4, mask=m, other=0.0)
            bz = tl.load(corners_ptr + t * 9 + 5, mask=m, other=0.0)
            qx = tl.load(corners_ptr + t * 9 + 6, mask=m, other=0.0)
            qy = tl.load(corners_ptr + t * 9 + 7, mask=m, other=0.0)
            qz = tl.load(corners_ptr + t * 9 + 8, mask=m, other=0.0)
            abx, aby, abz = bx - ax, by - ay, bz - az
            acx, acy, acz = qx - ax, qy - ay, qz - az
            apx, apy, apz = px - ax, py - ay, pz - az
            d1 = abx * apx + aby * apy + abz * apz
            d2 = acx * apx + acy * apy + acz * apz
            ab2 = abx * abx + aby * aby + abz * abz
            ac2 = acx * acx + acy * acy + acz * acz
            abac = abx * acx + aby * acy + abz * acz
            d3 = d1 - ab2
            d4 = d2 - abac
            d5 = d1 - abac
            d6 = d2 - ac2
            va = d3 * d6 - d5 * d4
            vb = d5 * d2 - d1 * d6
            vc = d1 * d4 - d3 * d2
            den = va + vb + vc
            v = _safe_div(vb, den)
            w = _safe_div(vc, den)
            r = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)  # edge bc
            e = tl.minimum(tl.maximum(_safe_div(d4 - d3, (d4 - d3) + (d5 - d6)), 0.0), 1.0)
            v = tl.where(r, 1 - e, v)
            w = tl.where(r, e, w)
            r = (vb <= 0) & (d2 >= 0) & (d6 <= 0)  # edge ac
            e = tl.minimum(tl.maximum(_safe_div(d2, d2 - d6), 0.0), 1.0)
            v = tl.where(r, 0.0, v)
            w = tl.where(r, e, w)
            r = (vc <= 0) & (d1 >= 0) & (d3 <= 0)  # edge ab
            e = tl.minimum(tl.maximum(_safe_div(d1, d1 - d3), 0.0), 1.0)
            v = tl.where(r, e, v)
            w = tl.where(r, 0.0, w)
            r = (d6 >= 0) & (d5 <= d6)  # vertex c
            v = tl.where(r, 0.0, v)
            w = tl.where(r, 1.0, w)
            r = (d3 >= 0) & (d4 <= d3)  # vertex b
            v = tl.where(r, 1.0, v)
            w = tl.where(r, 0.0, w)
            r = (d1 <= 0) & (d2 <= 0)  # vertex a
            v = tl.where(r, 0.0, v)
            w = tl.where(r, 0.0, w)
            ox = apx - v * abx - w * acx
            oy = apy - v * aby - w * acy
            oz = apz - v * abz - w * acz
            dd = ox * ox + oy * oy + oz * oz
            # collinear triangles: the nearest of their three edges (ab, bc, ca in that order). The
            # torch path's test |ab|²|ac|² - (ab·ac)², fused into an FMA on the GPU, leaves a rounding
            # residue far above the threshold; |ab x ac|² is zero up to rounding of its own size
            crx = aby * acz - abz * acy
            cry = abz * acx - abx * acz
            crz = abx * acy - aby * acx
            degen = crx * crx + cry * cry + crz * crz <= 1e-10 * ab2 * ac2 + 1.1754943508222875e-38
            s_ab, e_ab = _edge(px, py, pz, ax, ay, az, bx, by, bz)
            s_bc, e_bc = _edge(px, py, pz, bx, by, bz, qx, qy, qz)
            s_ca, e_ca = _edge(px, py, pz, qx, qy, qz, ax, ay, az)
            g_bc = e_bc < e_ab
            g_ca = e_ca < tl.where(g_bc, e_bc, e_ab)
            de = tl.where(g_ca, e_ca, tl.where(g_bc, e_bc, e_ab))
            # weights of (b, c): ab -> (s, 0); bc -> (1 - s, s); ca -> (0, 1 - s)
            dv = tl.where(g_ca, 0.0, tl.where(g_bc, 1 - s_bc, s_ab))
            dw = tl.where(g_ca, 1 - s_ca, tl.where(g_bc, s_bc, 0.0))
            dd = tl.where(degen, de, dd)
            v = tl.where(degen, dv, v)
            w = tl.where(degen, dw, w)
            better = m & (dd < best)
            best = tl.where(better, dd, best)
            best_face = tl.where(better, t, best_face)
            best_v = tl.where(better, v, best_v)
            best_w = tl.where(better, w, best_w)
    found = best_face >= 0
    tl.store(dist_ptr + offs, tl.where(found, tl.sqrt(best), float("inf")), mask=live)
    tl.store(face_ptr + offs, best_face, mask=live)
    tl.store(bary_ptr + offs * 3 + 0, tl.where(found, 1 - best_v - best_w, 0.0), mask=live)
    tl.store(bary_ptr + offs * 3 + 1, best_v, mask=live)
    tl.store(bary_ptr + offs * 3 + 2, best_w, mask=live)


def closest_in_cells(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor, tris: torch.Tensor,
                     corners: torch.Tensor, spheres: torch.Tensor, reach: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """points [P,3] f32; start/end [P,27] int64 (positions into tris, the candidate ranges of the 27
    cells); tris [T] int64 triangle ids; corners [F,9] f32 (a, b, c); spheres [F,4] f32 (centre,
    radius); reach: the cell side. Returns (distance [P] f32, inf where none; face [P] int64, -1
    then; bary [P,3] f32)."""
    P = points.shape[0]
    dev = points.device
    dist = torch.empty(P, dtype=torch.float32, device=dev)
    face = torch.empty(P, dtype=torch.int64, device=dev)
    bary = torch.empty(P, 3, dtype=torch.float32, device=dev)
    if P:
        _closest_kernel[(triton.cdiv(P, BLOCK),)](
            points.float().contiguous(), start.contiguous(), end.contiguous(), tris.contiguous(),
            corners.contiguous(), spheres.contiguous(), dist, face, bary, P, float(reach), BLOCK=BLOCK)
    return dist, face, bary
