"""Stage costs of the full-size networks on a CUDA GPU, from H200 measurements in
benchmarks/results/ (the planner's default until `Pipeline.calibrate` measures the GPU at hand).

Each entry names the file it comes from. Flow stages: the eager forward's activation bytes per row
(call peaks at 4,377 and 17,489 tokens, batch 1) times the two rows of the batched CFG pair, plus the
cuda backend's projection cache (30 blocks x 1536 channels x bf16 per token and condition); their
carried bytes are the projected condition and its zero twin (2048 fp32 channels each per token).
Seconds: the cuda backend's sampling times (12 steps), fitted a·n + b·n² through the two shape
stages. Stages no file measures are left out: the planner marks them and counts their weights and
carried values only.
"""
from __future__ import annotations

from .planner import StageCost

_EAGER_ROW_BYTES = (863_108_096 - 216_214_528) / (17_489 - 4_377)  # eager_baseline_h200.json
_PROJ_CACHE_BYTES = 30 * 1536 * 2 * 2
_COND_BYTES = 2048 * 4 * 2
# flows_h200.json sampling.fast_s: shape_lr 0.522 s @ 4,377, shape_hr 3.478 s @ 17,489
_A = 9.27e-5
_B = 6.07e-9
_TEX_SCALE = 2.074 / 3.478  # tex_flow's 3.478 → 2.074 s at the same count (fewer guided steps)


def _flow(at: int, source: str, scale: float = 1.0) -> StageCost:
    return StageCost(carried_per_unit=_COND_BYTES, transient_fixed=2_300_000,
                     transient_per_unit=2 * _EAGER_ROW_BYTES + _PROJ_CACHE_BYTES,
                     seconds_per_unit=_A * scale, seconds_per_unit2=_B * scale, measured_at=at, source=source)


_FLOWS = "eager_baseline_h200.json (bytes), flows_h200.json (seconds)"
# decoders: bytes and seconds per decoded voxel (the reference mug: 4,136,708 voxels at 1024, 4,163,240 at 512)
_DECODE = ("sparse_conv_h200.json: decode peak 3.30 GB − 1.14 GB resident, 216 ms warm, 4,136,708 voxels at 1024; "
           "bench 512 under an 8 GiB plan: 591 B/voxel, the larger; less 99 B/voxel for the finest level's neighbour "
           "map taken in row chunks (CPU LiveBytes, one fused up-block: 808 -> 709 B/child), plus the GPU hash "
           "table's 25 B/voxel over the CPU's sorted keys (2^24 slots x 12 B at 4.1 M voxels vs 24 B/voxel)")
_DECODE_BYTES = 591 - 99 + 25
_DECODE_S = 0.216 / 4_136_708
# mesh extraction: bench at 512 (8 GiB plan) measured 770 B/voxel for the unchunked extraction (torch peak 4.85 GB
# over 1.65 GB resident, 4,163,240 voxels); the chunked one allocates 303 B/voxel less (LiveBytes on the CPU, same tensors)
_EXTRACT = ("bench_512 (8 GiB plan): 770 B/voxel unchunked, 14 ms, 4,163,240 voxels; less 303 B/voxel "
            "for the chunked edge lookup (CPU LiveBytes: 458 -> 155 B/voxel)")
H200_COSTS = {
    "ss_flow": _flow(4096, _FLOWS),
    "shape_lr_flow": _flow(4377, _FLOWS),
    "shape_hr_flow": _flow(17_489, _FLOWS),
    "tex_flow": _flow(17_489, _FLOWS, _TEX_SCALE),
    # back-projection (Triton) 144 MB @ 17,489 / 322 MB @ 39,000 tokens; NAF lazy map 359 MB, 0.357 s at T=1024
    "shape_hr_cond": StageCost(transient_fixed=144_391_168 - 17_489 * 8_280 + 359_437_824, transient_per_unit=8_280,
                               seconds_fixed=0.357, measured_at=17_489,
                               source="conditioning_h200.json (back-projection + NAF lazy map at T=1024)"),
    "tex_cond": StageCost(transient_fixed=144_391_168 - 17_489 * 8_280 + 359_437_824, transient_per_unit=8_280,
                          seconds_fixed=0.357, measured_at=17_489,
                          source="conditioning_h200.json (back-projection + NAF lazy map at T=1024)"),
    "shape_decoder": StageCost(transient_per_unit=_DECODE_BYTES, seconds_per_unit=_DECODE_S, measured_at=4_136_708,
                               source=_DECODE),
    # the texture decoder runs the same widths over the same levels (guided by the shape's subdivisions)
    "tex_decoder": StageCost(transient_per_unit=_DECODE_BYTES, seconds_per_unit=_DECODE_S, measured_at=4_136_708,
                             source=_DECODE + " (shape decoder)"),
    # carried: the decoded fields it reads (int32 coords [4] + 7 half channels per voxel)
    "mesh_extraction": StageCost(carried_per_unit=4 * 4 + 7 * 2, transient_per_unit=770 - 303, seconds_per_unit=0.014 / 4_163_240, measured_at=4_163_240,
                                 source=_EXTRACT),
}
