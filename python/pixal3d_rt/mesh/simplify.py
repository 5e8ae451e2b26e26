"""Quadric decimation on all CPU cores, and the topology repair that keeps a closed surface closed.

`simplify(vertices, faces, target)` runs `fast_simplification` (Forstmann's QEM edge collapse, the
library trimesh uses). That library keeps its mesh in one process-wide state and holds the GIL, so it
parallelises only across processes:
  1. the faces are split into K spatial parts of equal face count (cuts across the longest side of the
     face centroids' box, K = the usable cores);
  2. every part is decimated in a worker process to its share of the target with `preserve_border`:
     a vertex shared with another part lies on the part's cut border, so it is never collapsed and
     keeps its exact position, and the parts stitch back by those vertices;
  3. the stitched mesh is still dense along the cuts: a closed one gets a pass over the band of faces
     around the cuts only (its rim locked); an open one a pass over the whole mesh, so that its open
     borders (locked in the parts too) thin out as in the serial run.
Small meshes (below `PARALLEL_MIN_FACES`) and machines with fewer than `PARALLEL_MIN_CORES` usable
cores take the serial path by default; PIXAL3D_DISABLE_PARALLEL_SIMPLIFY=1 forces it.

Forstmann's collapse has no link-condition test: it pinches thin walls, tubes and handles into edges
shared by four or more faces, vertices where two cones touch, and pairs of coincident faces.
`make_manifold` undoes that afterwards (either path): coincident faces cancel in pairs, the faces
around every shared edge are paired as sheets, and every vertex is split into one copy per fan, so a
pinch becomes two sheets that touch and a closed input stays closed. Imports only numpy (and the
library in the workers), so worker processes start quickly.
"""
from __future__ import annotations

import os
import pickle
import threading
import warnings

import numpy as np

from ..config import env_flag

PARALLEL_MIN_FACES = 400_000  # smaller meshes stay in one process (starting and feeding workers is a fixed cost)
# By default the parts run only with this many usable cores: this process's own share of the parallel
# path (cutting, sending, stitching, the seam band, the repair) is a fifth to a half of a one-process
# run, so two workers shorten the critical path a little and lose when other work shares the cores
# (benchmarks/results/simplify_cpu.json); from four the same accounting predicts a clear gain
PARALLEL_MIN_CORES = 4
DISABLE_PARALLEL_ENV = "PIXAL3D_DISABLE_PARALLEL_SIMPLIFY"
_SEAM_SLACK = 1.01  # a face count within this factor of the target needs no further pass
_SEAM_FACES_PER_VERTEX = 2  # faces a locked cut vertex keeps beside it in its part's result, about


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------
# worker processes: started on first use, kept for later calls (a start costs a Python and numpy import).
# Plain subprocesses speaking pickle over their pipes, not multiprocessing: spawn re-runs the caller's
# main script in every child (a script without a __main__ guard would recurse), and fork would copy the
# parent's torch/OpenMP threads and locks mid-flight.


class _Worker:
    """One worker subprocess running `_serve`."""

    def __init__(self):
        import subprocess
        import sys

        env = dict(os.environ)
        # the child finds this package where the parent did (an in-tree run, a path set at run time)
        extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + extra)
        self.proc = subprocess.Popen([sys.executable, "-c", "from pixal3d_rt.mesh.simplify import _serve; _serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, *args) -> None:
        pickle.dump(args, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def receive(self):
        status, value, self.cpu_seconds = pickle.load(self.proc.stdout)
        if status != "ok":
            raise RuntimeError(f"simplification worker failed: {value}")
        return value

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - already gone, or stuck: make sure it goes
            self.proc.kill()


_workers: list[_Worker] = []
_workers_pid = 0  # the process that started them: a forked child must not share their pipes
_workers_lock = threading.Lock()  # one caller at a time talks to them (e.g. a server's export threads)
_atexit_registered = False


def _get_workers(n: int) -> list[_Worker]:
    global _workers, _workers_pid, _atexit_registered
    if _workers_pid != os.getpid():
        _workers, _workers_pid = [], os.getpid()  # inherited through fork: the parent's, left alone
    _workers = [w for w in _workers if w.alive()]
    if not _atexit_registered:
        import atexit

        atexit.register(shutdown_workers)
        _atexit_registered = True
    while len(_workers) < n:
        _workers.append(_Worker())
    return _workers[:n]


def shutdown_workers() -> None:
    """Stop the worker processes (otherwise kept until the interpreter exits)."""
    global _workers
    if _workers_pid == os.getpid():
        for w in _workers:
            w.close()
    _workers = []


def _serve() -> None:
    """Worker main loop: ("part", `_decimate_part` arguments...) tuples pickled in on stdin,
    ("ok" | "error", value, CPU seconds spent) pickled out."""
    import sys
    import time

    # the protocol gets the real stdout; anything a library prints goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    while True:
        try:
            args = pickle.load(inp)
        except EOFError:
            return
        cpu = time.process_time()
        try:
            if args[0] != "part":
                raise ValueError(f"unknown request {args[0]!r}")
            reply = ("ok", _decimate_part(*args[1:]), time.process_time() - cpu)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which falls back to serial
            reply = ("error", f"{type(e).__name__}: {e}", time.process_time() - cpu)
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


# ---------------------------------------------------------------------------------------------------
# spatial partition


def partition_faces(points: np.ndarray, parts: int) -> np.ndarray:
    """Label points (face centroids [F,3]) with one of `parts` spatial parts of (nearly) equal size:
    recursive cuts across the longest side of each part's bounding box at the point that splits its
    count in proportion to the parts on either side (a linear-time selection, not a sort).
    Deterministic."""
    n = len(points)
    label = np.zeros(n, dtype=np.int64)
    stack = [(np.arange(n), 0, max(int(parts), 1))]
    while stack:
        idx, first, k = stack.pop()
        if k == 1 or len(idx) < 2:
            label[idx] = first
            continue
        p = points[idx]
        axis = int(np.argmax(p.max(axis=0) - p.min(axis=0)))
        k_lo = k // 2
        cut = max(1, min(len(idx) - 1, (len(idx) * k_lo) // k))
        sel = np.argpartition(p[:, axis], cut - 1)
        stack.append((idx[sel[:cut]], first, k_lo))
        stack.append((idx[sel[cut:]], first + k_lo, k - k_lo))
    return label


def face_centroids(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[F,3] float32 centroid of every face (what `simplify` partitions)."""
    return (vertices[faces[:, 0]] + vertices[faces[:, 1]] + vertices[faces[:, 2]]) / np.float32(3.0)


# ---------------------------------------------------------------------------------------------------
# decimation


def _decimate(points: np.ndarray, faces: np.ndarray, target: int, agg: float, preserve_border: bool):
    import fast_simplification

    return fast_simplification.simplify(np.asarray(points, dtype=np.float64), np.asarray(faces, dtype=np.int32),
                                        target_count=int(target), agg=agg, preserve_border=preserve_border)


def _row_keys(x: np.ndarray) -> np.ndarray:
    """float64 rows [N,3] as one 24-byte key each (bit patterns: exact equality, sortable)."""
    return np.ascontiguousarray(x, dtype=np.float64).view(np.dtype((np.void, 24))).reshape(-1)


def _separate_coincident(vertices: np.ndarray) -> np.ndarray:
    """vertices [V,3] float32, with bit-identical rows made to differ: the k-th copy of a position has
    its x moved by k units in the last place. Locked vertices are found again by position, and the
    repair leaves coincident copies (sheets that touch) on purpose."""
    from .glb import _row_groups

    group, first = _row_groups((vertices + np.float32(0.0)).view(np.uint32))
    if len(first) == len(vertices):
        return vertices
    order = np.argsort(group, kind="stable")
    gs = group[order]
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    rank = np.empty(len(vertices), dtype=np.int32)
    rank[order] = np.arange(len(vertices)) - np.repeat(starts, np.diff(np.r_[starts, len(vertices)]))
    out = np.array(vertices, dtype=np.float32, copy=True)
    bits = out[:, 0].view(np.int32)
    bits += rank  # k ulps away from zero (positive x) or towards it (negative x): distinct either way
    return out


def _decimate_part(points: np.ndarray, faces: np.ndarray, target: int, agg: float, locked: np.ndarray):
    """Decimate a piece cut out of a mesh, its border locked (run in a worker, or in-process).

    points [V,3] float32, faces [F,3] int32 local, locked [S] local ids of the vertices the caller must
    find again (on the cuts). Returns (points [V',3] float32, faces [F',3] int32, where [S] int64: the
    output row of every locked vertex, or None when one did not come back alone at its position (the
    caller then decimates serially), open: the piece has border vertices other than `locked`).
    Locked vertices keep their coordinates bit for bit, so they are found by exact position."""
    points = _separate_coincident(np.asarray(points, dtype=np.float32))
    pts, tri = _decimate(points, faces, target, agg, preserve_border=True)
    keys = _row_keys(pts)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    want = _row_keys(points[locked])
    where = None
    if len(sk):
        pos = np.clip(np.searchsorted(sk, want), 0, len(sk) - 1)
        nxt = np.minimum(pos + 1, len(sk) - 1)
        alone = (nxt == pos) | (sk[nxt] != want)  # no second output vertex on the same spot
        if bool(np.all(sk[pos] == want)) and bool(alone.all()):
            where = order[pos].astype(np.int64)
    elif len(want) == 0:
        where = np.zeros(0, np.int64)
    # border vertices of the result that are not the locked ones: the input had an open border here
    e = np.sort(tri[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).astype(np.int64), axis=1)
    key = e[:, 0] * max(len(pts), 1) + e[:, 1]
    uniq, count = np.unique(key, return_counts=True)
    border = np.zeros(len(pts), dtype=bool)
    border[uniq[count == 1] // max(len(pts), 1)] = True
    border[uniq[count == 1] % max(len(pts), 1)] = True
    if where is not None:
        border[where] = False
    return pts.astype(np.float32), tri.astype(np.int32), where, bool(border.any())


def _pieces(faces: np.ndarray, label: np.ndarray, parts: int, n_v: int):
    """Per part: (face ids, used vertex ids in id order, faces renumbered into them int32, local ids of
    the vertices the part shares with other parts); plus the shared-vertex mask."""
    first_part = np.full(n_v, -1, dtype=np.int64)
    flat_v = faces.reshape(-1)
    flat_p = np.repeat(label, 3)
    first_part[flat_v] = flat_p  # some part that uses the vertex
    shared = np.zeros(n_v, dtype=bool)
    shared[flat_v[flat_p != first_part[flat_v]]] = True
    used_mask = np.zeros(n_v, dtype=bool)
    out = []
    for p in range(parts):
        fid = np.flatnonzero(label == p)
        used_mask[:] = False  # a mask and a running count renumber without a sort
        used_mask[faces[fid].reshape(-1)] = True
        used = np.flatnonzero(used_mask)
        local = (np.cumsum(used_mask) - 1)[faces[fid]].astype(np.int32)
        out.append((fid, used, local, np.flatnonzero(shared[used])))
    return out, shared


def _stitch(vertices: np.ndarray, faces: np.ndarray, label: np.ndarray, target: int, agg: float,
            pool: list[_Worker]):
    """Decimate part p (label) in pool[p] and stitch the parts by their shared vertices.

    Returns (vertices, faces, cut: [V'] bool, the stitched vertices on a cut, open: some part has an
    open border, the workers' CPU seconds), or None if a part could not keep its shared vertices (a
    non-manifold vertex on a cut)."""
    n_f = len(faces)
    pieces, shared = _pieces(faces, label, len(pool), len(vertices))
    shared_ids = np.flatnonzero(shared)
    shared_new = np.cumsum(shared) - 1  # stitched id of a shared vertex
    jobs = []
    for p, (fid, used, local, shared_local) in enumerate(pieces):
        # its share of the target, plus about the faces its locked cut vertices keep around them: the
        # seam pass removes those, where the cut kept the surface dense
        part_target = max(round(target * len(fid) / n_f) + _SEAM_FACES_PER_VERTEX * len(shared_local), 1)
        if part_target >= len(fid):  # nothing to remove: keep the part as it is
            jobs.append(None)
            continue
        pool[p].send("part", vertices[used], local, part_target, agg, shared_local)
        jobs.append(pool[p])
    results = [None if job is None else job.receive() for job in jobs]  # every reply, to keep the pipes in step
    worker_cpu = [round(job.cpu_seconds, 3) for job in jobs if job is not None]
    out_v = [vertices[shared_ids]]
    out_f = []
    offset = len(shared_ids)
    any_open = False
    for (fid, used, local, shared_local), res in zip(pieces, results):
        if res is None:
            pts, tri, where, is_open = vertices[used], local, shared_local, True
        else:
            pts, tri, where, is_open = res
            if where is None:
                return None
        any_open |= is_open
        # output rows: shared ones -> their stitched id, the rest -> new ids after everything so far
        gid = np.full(len(pts), -1, dtype=np.int64)
        gid[where] = shared_new[used[shared_local]]
        own = gid < 0
        gid[own] = offset + np.arange(int(own.sum()))
        offset += int(own.sum())
        out_v.append(pts[own])
        out_f.append(gid[tri])
    cut = np.zeros(offset, dtype=bool)
    cut[: len(shared_ids)] = True
    return (np.concatenate(out_v).astype(np.float32), np.concatenate(out_f).astype(np.int64), cut, any_open,
            worker_cpu)


def _seam_pass(v: np.ndarray, f: np.ndarray, cut: np.ndarray, target: int, agg: float, rings: int = 3):
    """Decimate only the band of faces within `rings` vertex rings of the cut vertices, its outer rim
    locked, by the faces above `target`: the rest of the surface is done already. Returns (v, f), or
    None when the band's rim could not be kept."""
    near = cut.copy()
    for _ in range(rings):
        band = near[f].any(axis=1)
        near[f[band].reshape(-1)] = True
    band = near[f].any(axis=1)
    fid = np.flatnonzero(band)
    remove = len(f) - target
    if remove <= 0 or len(fid) == 0:
        return v, f
    used_mask = np.zeros(len(v), dtype=bool)
    used_mask[f[fid].reshape(-1)] = True
    used = np.flatnonzero(used_mask)
    local = (np.cumsum(used_mask) - 1)[f[fid]].astype(np.int32)
    outside = np.zeros(len(v), dtype=bool)
    outside[f[~band].reshape(-1)] = True
    rim = np.flatnonzero(outside[used])  # band vertices that faces outside the band use
    pts, tri, where, _ = _decimate_part(v[used], local, max(len(fid) - remove, 1), agg, rim)
    if where is None:
        return None
    gid = np.full(len(pts), -1, dtype=np.int64)
    gid[where] = used[rim]
    own = gid < 0
    gid[own] = len(v) + np.arange(int(own.sum()))
    nv = np.concatenate([v, pts[own]])
    from .glb import _compact

    return _compact(nv, np.concatenate([f[~band], gid[tri]]))


def simplify(vertices, faces, target_faces: int, *, aggressiveness: float = 7.0, workers: int | None = None,
             repair: bool = True, info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decimate to about `target_faces` faces. vertices [V,3] float, faces [F,3] int (numpy).
    workers: processes for the parallel path (default: the usable cores if at least
    PARALLEL_MIN_CORES, else 1; 1 when PIXAL3D_DISABLE_PARALLEL_SIMPLIFY is set; 1 = serial);
    repair: run `make_manifold` on the result.
    info, if given, receives "parts" (1 = serial), "stitched_faces" (after the parts), "seam" ("band",
    "whole" or "none"), seconds per stage ("parts_s", "seam_s", "serial_s", "repair_s") and the
    workers' CPU seconds ("worker_cpu_s").
    Returns (vertices float32, faces int64)."""
    import time

    info = info if info is not None else {}
    v = np.asarray(vertices, dtype=np.float32)
    f = np.asarray(faces, dtype=np.int64)
    if workers is None:
        cores = usable_cores()
        workers = cores if cores >= PARALLEL_MIN_CORES and not env_flag(DISABLE_PARALLEL_ENV) else 1
    out = None
    info["parts"] = 1
    if workers > 1 and len(f) >= PARALLEL_MIN_FACES and target_faces * 2 <= len(f):
        t = time.perf_counter()
        stitched = None
        with _workers_lock:
            try:
                pool = _get_workers(workers)  # they start while the parts are cut
                stitched = _stitch(v, f, partition_faces(face_centroids(v, f), len(pool)), target_faces,
                                   aggressiveness, pool)
                why = "a cut ran through a non-manifold vertex"
            except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:  # a worker failed or died
                shutdown_workers()  # their pipes may hold half a message
                why = f"{type(e).__name__}: {e}"
            except BaseException:  # interrupted mid-conversation: the pipes are out of step
                shutdown_workers()
                raise
        info["parts_s"] = time.perf_counter() - t
        if stitched is None:
            warnings.warn(f"parallel simplification failed ({why}); simplifying serially", RuntimeWarning,
                          stacklevel=2)
        else:
            sv, sf, cut, is_open, info["worker_cpu_s"] = stitched
            info["parts"], info["stitched_faces"] = len(pool), len(sf)
            t = time.perf_counter()
            info["seam"] = "none"
            out = (sv, sf)
            if len(sf) > target_faces * _SEAM_SLACK:
                # a closed surface: only the band along the cuts is still dense. An open one: the parts
                # kept their open borders locked too, so the whole mesh gets the pass (border vertices
                # may then collapse along the border, as in the serial run)
                band = None if is_open else _seam_pass(sv, sf, cut, target_faces, aggressiveness)
                if band is not None and len(band[1]) <= target_faces * _SEAM_SLACK:
                    out, info["seam"] = band, "band"
                else:  # open, or a target too small for the band alone (its rim is locked)
                    out, info["seam"] = _decimate(sv, sf, target_faces, aggressiveness, preserve_border=False), "whole"
            info["seam_s"] = time.perf_counter() - t
    if out is None:
        t = time.perf_counter()
        out = _decimate(v, f, target_faces, aggressiveness, preserve_border=False)
        info["serial_s"] = time.perf_counter() - t
    sv, sf = np.asarray(out[0], dtype=np.float32), np.asarray(out[1], dtype=np.int64)
    if repair:
        t = time.perf_counter()
        sv, sf = make_manifold(sv, sf)
        info["repair_s"] = time.perf_counter() - t
    return sv, sf


# ---------------------------------------------------------------------------------------------------
# topology repair


def union_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (the smallest member) of n nodes joined by links a[i]-b[i]:
    roots hook onto smaller roots, pointer jumping between rounds; vectorised."""
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while True:
        while True:  # compress
            gp = parent[parent]
            if np.array_equal(gp, parent):
                break
            parent = gp
        ra, rb = parent[a], parent[b]
        cross = ra != rb
        if not cross.any():
            return parent
        a, b, ra, rb = a[cross], b[cross], ra[cross], rb[cross]
        hi, lo = np.maximum(ra, rb), np.minimum(ra, rb)
        # every root hooks onto the smallest root it is linked to this round
        best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, hi, lo)
        roots = best < n
        parent[roots] = best[roots]


def _pair_faces_around_edges(v, f, entries, edge_of, first, size, forward):
    """Pair the faces of edges shared by more than two faces, as sheets: sorted by angle around the
    edge, neighbours paired, of the two ways to do that the one with more pairs of opposite direction
    along the edge (as consistently wound sheets have), then with better aligned normals.

    entries: directed edge ids (3 * face + slot) of those edges, grouped by edge; edge_of: their edge
    (0..E'-1); first/size: each edge's first entry and count. Returns (x, y, e): paired entries and
    their edge; an odd count leaves one face unpaired (a border)."""
    q, k = entries // 3, entries % 3
    tail, head, third = f[q, k], f[q, (k + 1) % 3], f[q, (k + 2) % 3]
    lo = np.minimum(tail, head)
    hi = np.maximum(tail, head)
    a = v[lo].astype(np.float64)
    axis = v[hi] - a
    axis /= np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-30)
    w = v[third] - a
    w -= (w * axis).sum(1, keepdims=True) * axis
    ref = w[first][edge_of]  # the edge's first face sets angle zero
    ref /= np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-30)
    angle = np.arctan2((np.cross(axis, ref) * w).sum(1), (ref * w).sum(1))
    srt = np.lexsort((entries, angle, edge_of))
    entries, edge_of, forward = entries[srt], edge_of[srt], forward[srt]
    tri = v[f[entries // 3]].astype(np.float64)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
    pos = np.arange(len(entries)) - first[edge_of]  # position around the edge
    n = size[edge_of]
    # way 0 pairs positions (0,1), (2,3), ...; way 1 pairs (1,2), ..., (n-1, 0) (even counts only)
    mate0 = np.where(pos % 2 == 0, pos + 1, pos - 1)
    mate1 = np.where(pos % 2 == 1, (pos + 1) % n, (pos - 1) % n)
    lead0 = (pos % 2 == 0) & (mate0 < n)
    lead1 = (pos % 2 == 1) & (n % 2 == 0)
    scores = []
    for lead, mate in ((lead0, mate0), (lead1, mate1)):
        i = np.flatnonzero(lead)
        j = first[edge_of[i]] + mate[i]
        score = (forward[i] != forward[j]) * 4.0 + (normal[i] * normal[j]).sum(1)  # direction counts most
        scores.append(np.bincount(edge_of[i], score, minlength=len(first)) if len(i) else np.zeros(len(first)))
    way1 = (scores[1] > scores[0]) & (size % 2 == 0)
    lead = np.where(way1[edge_of], lead1, lead0)
    mate = np.where(way1[edge_of], mate1, mate0)
    i = np.flatnonzero(lead)
    j = first[edge_of[i]] + mate[i]
    return entries[i], entries[j], edge_of[i]


def make_manifold(vertices: np.ndarray, faces: np.ndarray, max_rounds: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Undo the non-manifold configurations edge collapses leave, keeping the geometry:
      - faces with a repeated vertex are dropped;
      - faces on the same three vertices cancel in pairs (a flattened fin or tube end);
      - the faces of an edge shared by 2k faces are paired into k sheets (`_pair_faces_around_edges`),
        and every vertex of such an edge is split into one copy per fan: its faces joined through
        their pairs. Where two pairs of one edge still land in the same fan at both ends, they swap
        partners; a swap only ever splits a fan (never joins two), and for consistently wound faces
        the swap that keeps opposite directions together always splits, so the rounds end with every
        edge of a closed surface shared by exactly two faces. Two sheets pinched together become two
        sheets that touch.
    Unreferenced vertices are dropped. Returns (vertices [V',3] float32, faces [F',3] int64)."""
    from .glb import _compact, _edge_table, _row_groups

    v = np.asarray(vertices, dtype=np.float32)
    f = np.asarray(faces, dtype=np.int64)
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    if len(f) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    # coincident faces (the same three vertices) cancel in pairs, whatever their winding: the
    # simplifier ignores windings (its input need not be oriented), and a pair is a flattened fin
    group, _ = _row_groups(np.sort(f, axis=1))
    size = np.bincount(group)
    if size.max() > 1:
        dup = np.flatnonzero(size[group] > 1)
        g, first = np.unique(group[dup], return_index=True)  # keep the first face of groups of odd size
        keep = np.ones(len(f), dtype=bool)
        keep[dup] = False
        keep[dup[first[size[g] % 2 == 1]]] = True
        f = f[keep]
        if len(f) == 0:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)

    order, start, count, forward = _edge_table(f, len(v))

    # pairs: two-face edges pair their faces; edges of more faces pair them as sheets
    two = start[count == 2]
    px, py = order[two], order[two + 1]
    multi = np.flatnonzero(count > 2)
    mx = my = me = np.zeros(0, np.int64)
    if len(multi):
        m_first = np.cumsum(count[multi]) - count[multi]
        m_edge = np.repeat(np.arange(len(multi)), count[multi])
        m_entries = order[np.repeat(start[multi], count[multi]) + (np.arange(len(m_edge)) - m_first[m_edge])]
        mx, my, me = _pair_faces_around_edges(v, f, m_entries, m_edge, m_first, count[multi],
                                                    forward[m_entries])
    # fans are found at every vertex: collapsing an edge of four faces leaves two cones that touch at
    # a vertex only
    corner_vertex = f.reshape(-1)

    def corners(d):
        """(corner at the edge's lower vertex, corner at its higher vertex) of directed edges d."""
        q, k = d // 3, d % 3
        tail, head = 3 * q + k, 3 * q + (k + 1) % 3
        tail_low = corner_vertex[tail] < corner_vertex[head]
        return np.where(tail_low, tail, head), np.where(tail_low, head, tail)

    def joins(x, y):
        """corner links of paired directed edges x[i], y[i]: at both ends of their edge"""
        xl, xh = corners(x)
        yl, yh = corners(y)
        return np.concatenate([xl, xh]), np.concatenate([yl, yh])

    if len(me):
        # swap rounds on the corners of the shared edges' vertices only (nothing else changes)
        at_shared = np.zeros(len(v), dtype=bool)
        at_shared[corner_vertex[np.concatenate(corners(mx))]] = True
        local = at_shared[corner_vertex]
        sub = np.flatnonzero(local)
        dense = np.cumsum(local) - 1
        ta, tb = joins(px, py)
        keep = local[ta]
        ta, tb = dense[ta[keep]], dense[tb[keep]]
        rng = np.random.default_rng(0)
        for round_ in range(max_rounds + 1):
            sa, sb = joins(mx, my)
            sub_lab = union_labels(len(sub), np.concatenate([ta, dense[sa]]), np.concatenate([tb, dense[sb]]))
            xl, xh = corners(mx)
            fa, fb = sub_lab[dense[xl]], sub_lab[dense[xh]]
            srt = np.lexsort((np.arange(len(me)), fb, fa, me))
            same = (me[srt][1:] == me[srt][:-1]) & (fa[srt][1:] == fa[srt][:-1]) & (fb[srt][1:] == fb[srt][:-1])
            hits = np.flatnonzero(same)
            if len(hits) == 0 or round_ == max_rounds:
                break
            p_idx, q_idx = srt[hits], srt[hits + 1]
            # one swap per vertex per round: two swaps in one fan could join what the other split
            ends = np.stack([corner_vertex[xl[p_idx]], corner_vertex[xh[p_idx]]], 1)
            claim = np.full(len(v), len(p_idx), dtype=np.int64)
            np.minimum.at(claim, ends.reshape(-1), np.repeat(np.arange(len(p_idx)), 2))
            mine = (claim[ends[:, 0]] == np.arange(len(p_idx))) & (claim[ends[:, 1]] == np.arange(len(p_idx)))
            p_idx, q_idx = p_idx[mine], q_idx[mine]
            X, Y, Z, W = mx[p_idx], my[p_idx], mx[q_idx], my[q_idx]
            # (X,W),(Z,Y) or (X,Z),(Y,W): the one that keeps opposite directions along the edge
            # together (consistent windings: it always splits); a random one after the first rounds
            # (windings that are not consistent can need the other)
            use1 = ((forward[X] != forward[W]) & (forward[Z] != forward[Y])) | \
                ~((forward[X] != forward[Z]) & (forward[Y] != forward[W]))
            if round_ >= 8:
                use1 = rng.random(len(p_idx)) < 0.5
            my[p_idx] = np.where(use1, W, Z)
            mx[q_idx] = np.where(use1, Z, Y)
            my[q_idx] = np.where(use1, Y, W)
    ja, jb = joins(np.concatenate([px, mx]), np.concatenate([py, my]))
    lab = union_labels(len(corner_vertex), ja, jb)

    # a fan is named by its smallest corner; a vertex's first fan keeps the vertex, every further fan
    # gets a new copy of it
    roots = np.flatnonzero(lab == np.arange(len(lab)))
    root_vertex = corner_vertex[roots]
    first_root = np.full(len(v), len(lab), dtype=np.int64)
    np.minimum.at(first_root, root_vertex, roots)
    extra = first_root[root_vertex] != roots
    fan_id = np.empty(len(lab), dtype=np.int64)
    fan_id[roots] = root_vertex
    fan_id[roots[extra]] = len(v) + np.arange(int(extra.sum()))
    new_f = fan_id[lab]
    nv = np.concatenate([v, v[root_vertex[extra]]])
    return _compact(nv, new_f.reshape(-1, 3))
