"""Nearest point on a triangle mesh, for meshes that live on a voxel grid (torch, any device).

Upstream finds nearest triangles with a CUDA BVH (cuBVH). The decoded mesh needs none: every triangle
joins dual vertices of voxels at most one step apart, so it is about one voxel across. Triangles are
bucketed by the cubic cells their bounding boxes overlap; a query looks at the 3x3x3 cells around its
own. Any triangle closer to the query than one cell side overlaps one of those 27 cells, so the answer
is exact whenever the nearest triangle is within `cell` of the query; beyond that the query reports
"not found" (distance inf, face -1).

`closest_points` is the entry point; `closest_points_brute` (all pairs) is its test oracle.
"""
from __future__ import annotations

import torch

# the 27 neighbour offsets, on the CPU so an import under a device context leaves them alone
_OFFSETS27 = torch.tensor([[i // 9 - 1, (i // 3) % 3 - 1, i % 3 - 1] for i in range(27)], dtype=torch.int64,
                          device="cpu")


def closest_on_triangles(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest point of triangle (a, b, c) to p, row by row ([N,3] each).

    Returns (squared distance [N], barycentric weights [N,3] of a, b, c). Voronoi-region
    classification (vertex, edge or face region, as in Ericson's Real-Time Collision Detection),
    on coordinate columns (fewer temporaries than [N,3] arithmetic); degenerate (collinear)
    triangles are answered from their edges.
    """
    px, py, pz = p.unbind(1)
    ax, ay, az = a.unbind(1)
    abx, aby, abz = (b - a).unbind(1)
    acx, acy, acz = (c - a).unbind(1)
    apx, apy, apz = px - ax, py - ay, pz - az
    d1 = abx * apx + aby * apy + abz * apz
    d2 = acx * apx + acy * apy + acz * apz
    # (b - p) and (c - p) dotted with ab, ac, from d1, d2 and the edge Gram entries
    ab2 = abx * abx + aby * aby + abz * abz
    ac2 = acx * acx + acy * acy + acz * acz
    abac = abx * acx + aby * acy + abz * acz
    d3, d4 = d1 - ab2, d2 - abac
    d5, d6 = d1 - abac, d2 - ac2
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    tiny = torch.finfo(p.dtype).tiny

    def safe_div(n, d):
        return n / torch.where(d.abs() > tiny, d, torch.full_like(d, tiny))

    # (v, w): weights of b and c; the face interior first, then each region overrides
    den = va + vb + vc
    v, w = safe_div(vb, den), safe_div(vc, den)
    r = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)  # edge bc
    t = safe_div(d4 - d3, (d4 - d3) + (d5 - d6)).clamp(0, 1)
    v, w = torch.where(r, 1 - t, v), torch.where(r, t, w)
    r = (vb <= 0) & (d2 >= 0) & (d6 <= 0)  # edge ac
    t = safe_div(d2, d2 - d6).clamp(0, 1)
    v, w = torch.where(r, 0.0, v), torch.where(r, t, w)
    r = (vc <= 0) & (d1 >= 0) & (d3 <= 0)  # edge ab
    t = safe_div(d1, d1 - d3).clamp(0, 1)
    v, w = torch.where(r, t, v), torch.where(r, 0.0, w)
    r = (d6 >= 0) & (d5 <= d6)  # vertex c
    v, w = torch.where(r, 0.0, v), torch.where(r, 1.0, w)
    r = (d3 >= 0) & (d4 <= d3)  # vertex b
    v, w = torch.where(r, 1.0, v), torch.where(r, 0.0, w)
    r = (d1 <= 0) & (d2 <= 0)  # vertex a
    v, w = torch.where(r, 0.0, v), torch.where(r, 0.0, w)
    qx, qy, qz = apx - v * abx - w * acx, apy - v * aby - w * acy, apz - v * abz - w * acz
    d2q = qx * qx + qy * qy + qz * qz
    bary = torch.stack([1 - v - w, v, w], 1)
    # collinear triangles can land in the face branch with a meaningless point: use their edges
    cr2 = ab2 * ac2 - abac * abac  # |ab x ac|^2
    degen = torch.nonzero(cr2 <= 1e-10 * ab2 * ac2 + tiny).squeeze(1)
    if degen.numel():
        P, A, B, C = p[degen], a[degen], b[degen], c[degen]
        best = torch.full((degen.numel(),), float("inf"), dtype=p.dtype, device=p.device)
        bb = torch.zeros((degen.numel(), 3), dtype=p.dtype, device=p.device)
        for i, j, (pi, pj) in ((0, 1, (A, B)), (1, 2, (B, C)), (2, 0, (C, A))):
            e = pj - pi
            s = safe_div(((P - pi) * e).sum(-1), (e * e).sum(-1)).clamp(0, 1)
            de = ((P - pi - s[:, None] * e) ** 2).sum(-1)
            better = de < best
            nb = torch.zeros_like(bb)
            nb[:, i], nb[:, j] = 1 - s, s
            bb = torch.where(better[:, None], nb, bb)
            best = torch.where(better, de, best)
        d2q[degen], bary[degen] = best, bb
    return d2q, bary


class TriangleGrid:
    """Triangles bucketed by the cubic cells (side `cell`, corner `origin`) their bounding boxes overlap.

    keys [T] int64 sorted cell keys, tris [T] int64 the triangle in each (ascending within a cell);
    centre [F,3], radius [F] the triangles' bounding spheres. Built `chunk` triangles at a time and
    sorted once as packed (cell, triangle) pairs, so the memory beyond these is a chunk's and the sort's.
    """

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, cell: float, origin=None, chunk: int = 1 << 20):
        self.vertices = vertices.float()
        self.faces = faces.long()
        V, Fc = self.vertices, self.faces
        dev = V.device
        nf = Fc.shape[0]
        self.cell = float(cell)
        self._kernel_arrays = None
        if origin is None:  # the lowest corner of the triangles (min is exact, so any gather order gives it)
            used = torch.zeros(V.shape[0], dtype=torch.bool, device=dev)
            used[Fc.reshape(-1)] = True
            origin = V[used].amin(0) if nf else torch.zeros(3, device=dev)
        self.origin = torch.as_tensor(origin, dtype=torch.float32, device=dev)
        self.centre = torch.empty((nf, 3), device=dev)
        self.radius = torch.empty(nf, device=dev)
        # equal chunks: the last is no smaller than the others
        n_chunks = -(-nf // max(1, chunk))
        bounds = [(nf * i // n_chunks, nf * (i + 1) // n_chunks) for i in range(n_chunks)]

        def cell_box(tri):
            lo = torch.floor((tri.amin(1) - self.origin) / self.cell).long()
            hi = torch.floor((tri.amax(1) - self.origin) / self.cell).long()
            return lo, hi

        # pass 1: bounding spheres, the key box, the number of (cell, triangle) pairs per chunk
        lows, highs, counts = [], [], []
        for a, b in bounds:
            tri = V[Fc[a:b]]  # [f,3,3]
            self.centre[a:b] = centre = tri.mean(1)
            self.radius[a:b] = (tri - centre[:, None]).norm(dim=2).amax(1)
            lo, hi = cell_box(tri)
            del tri, centre
            lows.append(lo.amin(0))
            highs.append(hi.amax(0))
            counts.append((hi - lo + 1).prod(1).sum())
        # key box padded by one cell on each side so a neighbour of any occupied cell has a key
        self.base = (torch.stack(lows).amin(0) - 1) if nf else torch.zeros(3, dtype=torch.long, device=dev)
        self.ext = (torch.stack(highs).amax(0) - self.base + 2) if nf else torch.ones(3, dtype=torch.long, device=dev)
        counts = torch.stack(counts).tolist() if counts else []
        ex, ey, ez = (int(e) for e in self.ext.tolist())
        # a pair packs into one int64 (key * F + triangle) when the key box allows: sorting it gives
        # keys in order and triangles ascending within a key, with no index array
        pack = nf if ex * ey * ez * nf < 2**63 else 0
        keys = torch.empty(sum(counts), dtype=torch.int64, device=dev)
        tids = None if pack else torch.empty_like(keys)

        # pass 2: the pairs; a triangle's cells are its box's, x-major, and the key is linear in the
        # cell: the box's low corner's key plus (i * ey + j) * ez + k
        o = 0
        for (a, b), t in zip(bounds, counts):
            lo, hi = cell_box(V[Fc[a:b]])
            span = hi.sub_(lo).add_(1)
            n = span.prod(1)
            f = torch.repeat_interleave(n, output_size=t)  # chunk-local triangle of each pair
            local = torch.arange(t, device=dev).sub_((torch.cumsum(n, 0) - n)[f])
            lo -= self.base
            k = ((lo[:, 0] * ey + lo[:, 1]) * ez + lo[:, 2])[f]
            del lo, n
            sz = span[:, 2][f]
            k += local % sz
            local //= sz  # i * sy + j
            del sz
            sy = span[:, 1][f]
            k += (local // sy * ey + local % sy) * ez
            del local, sy
            if pack:
                keys[o:o + t] = k.mul_(pack).add_(f).add_(a)
            else:
                keys[o:o + t], tids[o:o + t] = k, f + a
            o += t
            del f, k
        if pack:
            keys = torch.unique(keys)  # sorts; the pairs are distinct
            self.tris = keys % pack
            self.keys = keys.div_(pack, rounding_mode="floor")
        else:
            self.keys, order = torch.sort(keys, stable=True)
            self.tris = tids[order]

    def _key(self, cells: torch.Tensor) -> torch.Tensor:
        c = cells - self.base
        ex, ey, ez = (int(e) for e in self.ext.tolist())
        k = (c[:, 0] * ey + c[:, 1]) * ez + c[:, 2]
        outside = ((c < 0) | (c >= self.ext)).any(1)
        return torch.where(outside, torch.full_like(k, -1), k)

    def candidate_ranges(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[P,27] start and end positions (into self.tris) of the 27 cells around each point."""
        c = torch.floor((points.float() - self.origin) / self.cell).long() - self.base
        ex, ey, ez = (int(e) for e in self.ext.tolist())
        # the key is linear in the cell, so a neighbour's key is the point's cell's plus the offset's
        # ([P,27] keys, no [P*27,3] cells); -1 outside the key box, as in _key
        off = _OFFSETS27.to(points.device)
        k = ((c[:, 0] * ey + c[:, 1]) * ez + c[:, 2])[:, None] + (off[:, 0] * ey + off[:, 1]) * ez + off[:, 2]
        step = torch.arange(-1, 2, device=points.device)
        ok = (c[:, :, None] + step >= 0) & (c[:, :, None] + step < self.ext[:, None])  # [P,axis,offset]
        ok = (ok[:, 0, :, None, None] & ok[:, 1, None, :, None] & ok[:, 2, None, None, :]).reshape(-1, 27)
        k.masked_fill_(~ok, -1)
        del ok
        # keys are >= 0, so a -1 key gets the empty range [0, 0)
        start = torch.searchsorted(self.keys, k)
        end = torch.searchsorted(self.keys, k, right=True)
        return start, end

    def kernel_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(corners [F,9], bounding spheres [F,4]) as the Triton kernel reads them; made once per grid,
        which answers many slices of queries."""
        if self._kernel_arrays is None:
            corners = self.vertices[self.faces].reshape(-1, 9).contiguous()
            spheres = torch.cat([self.centre, self.radius[:, None]], 1).float().contiguous()
            self._kernel_arrays = (corners, spheres)
        return self._kernel_arrays

    def occupied_cells(self) -> torch.Tensor:
        """[C,3] integer cells holding at least one triangle."""
        k = torch.unique_consecutive(self.keys)
        ex, ey, ez = (int(e) for e in self.ext.tolist())
        return torch.stack([k // (ey * ez), (k // ez) % ey, k % ez], 1) + self.base


def _kernel_module(points: torch.Tensor, kernel: bool | None):
    """The Triton kernel module where it should run (CUDA, not switched off; or asked for), else None."""
    if kernel is False or (kernel is None and not points.is_cuda):
        return None
    try:
        from pixal3d_rt.kernels import closest_point_triton as cpt  # triton imported only here
    except ImportError:
        if kernel:
            raise
        return None
    return cpt if kernel or cpt.enabled() else None


def closest_points(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, cell: float, *,
                   grid: TriangleGrid | None = None, max_pairs: int = 1 << 23, kernel: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest point on the mesh for every query point, searched within the 3x3x3 cells of side `cell`.

    points [P,3]; vertices [V,3]; faces [F,3]. Returns (distance [P] float32, inf when no triangle lies
    within reach; face [P] int64, -1 then; bary [P,3] float32, weights of the face's vertices).
    Exact (the same nearest distance as `closest_points_brute`) for every point whose nearest triangle
    is closer than `cell`; found with distance >= cell only by luck. Pairs are processed `max_pairs`
    at a time, so memory stays bounded. kernel: the Triton kernel (kernels/closest_point_triton.py,
    the same answer without the pair arrays); default on CUDA, off with
    PIXAL3D_DISABLE_TRITON_CLOSEST=1.
    """
    dev = points.device
    P = points.shape[0]
    dist = torch.full((P,), float("inf"), dtype=torch.float32, device=dev)
    face = torch.full((P,), -1, dtype=torch.int64, device=dev)
    bary = torch.zeros((P, 3), dtype=torch.float32, device=dev)
    if P == 0 or faces.shape[0] == 0:
        return dist, face, bary
    g = grid if grid is not None else TriangleGrid(vertices.to(dev), faces.to(dev), cell)
    V, Fc = g.vertices, g.faces
    pts = points.float()
    cpt = _kernel_module(points, kernel)
    if cpt is not None:
        corners, spheres = g.kernel_arrays()
        step = max(1, max_pairs // 16)  # the [step,27] ranges are the chunk's memory
        for a in range(0, P, step):
            start, end = g.candidate_ranges(pts[a:a + step])
            dist[a:a + step], face[a:a + step], bary[a:a + step] = cpt.closest_in_cells(
                pts[a:a + step], start, end, g.tris, corners, spheres, g.cell)
            del start, end  # not held while the next slice's ranges are made
        return dist, face, bary
    step = max(1, max_pairs // 64)
    a = 0
    while a < P:
        b = min(P, a + step)
        start, end = g.candidate_ranges(pts[a:b])
        cnt = (end - start).clamp_min(0)
        per_point = cnt.sum(1)
        total = int(per_point.sum())
        if total > max_pairs and b - a > 1:  # too many pairs: halve the slice
            step = max(1, (b - a) // 2)
            continue
        if total:
            flat_cnt = cnt.reshape(-1)
            owner = torch.repeat_interleave(torch.arange(b - a, device=dev).repeat_interleave(27), flat_cnt)
            first = torch.repeat_interleave(start.reshape(-1), flat_cnt)
            offs = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(flat_cnt, 0) - flat_cnt, flat_cnt)
            tri = g.tris[first + offs]
            q = pts[a:b][owner]
            # bounding spheres drop most pairs before the exact test: only reach <= cell matters
            near = ((q - g.centre[tri]) ** 2).sum(1) <= (g.radius[tri] + g.cell) ** 2
            owner, tri, q = owner[near], tri[near], q[near]
            total = int(tri.numel())
            corners = V[Fc[tri]]
            d2, bc = closest_on_triangles(q, corners[:, 0], corners[:, 1], corners[:, 2])
            best = torch.full((b - a,), float("inf"), device=dev).scatter_reduce(0, owner, d2, "amin")
            # the first pair reaching the minimum wins (a triangle can sit in several cells)
            hit = d2 <= best[owner]
            idx = torch.full((b - a,), total, dtype=torch.int64, device=dev)
            idx = idx.scatter_reduce(0, owner[hit], torch.nonzero(hit).squeeze(1), "amin")
            found = idx < total
            sel = idx[found]
            rows = torch.arange(a, b, device=dev)[found]
            dist[rows] = d2[sel].sqrt()
            face[rows] = tri[sel]
            bary[rows] = bc[sel]
            del owner, first, offs, tri, q, near, corners, d2, bc, best, hit, idx  # not held into the next slice
        del start, end, cnt
        a = b
        step = min(step * 2, max(1, max_pairs // 64))
    return dist, face, bary


def closest_points_brute(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-pairs reference of `closest_points` (small inputs only): (distance, face, bary)."""
    P, F = points.shape[0], faces.shape[0]
    pi = torch.arange(P).repeat_interleave(F)
    fi = torch.arange(F).repeat(P)
    tri = vertices.double()[faces.long()[fi]]
    d2, bc = closest_on_triangles(points.double()[pi], tri[:, 0], tri[:, 1], tri[:, 2])
    d2 = d2.view(P, F)
    best = d2.argmin(1)
    return d2.gather(1, best[:, None])[:, 0].sqrt().float(), best, bc.view(P, F, 3)[torch.arange(P), best].float()


def project_onto(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, cell: float, **kw
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Points moved to their nearest point on the mesh where one lies within `cell` (others unchanged).
    Returns (projected [P,3], found [P] bool)."""
    _, face, bc = closest_points(points, vertices, faces, cell, **kw)
    found = face >= 0
    tri = vertices.float()[faces.long()[face.clamp_min(0)]]
    q = (bc[:, :, None] * tri).sum(1)
    return torch.where(found[:, None], q, points.float()), found
