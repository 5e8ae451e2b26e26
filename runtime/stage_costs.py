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
# decoders and mesh extraction: bytes and seconds per decoded voxel, from the warm runs in
# bench_reference_h100.json (benchmarks/costs_from_bench.py), the larger of the two decoders'; each
# resolution has its entry ("stage@R"); seconds 0.353 s / 4,136,708 voxels (texture, 1024), the slowest
_DECODE = "bench_reference_h100.json, warm run at {r}: {b} B/voxel (the larger decoder)"
_DECODE_BYTES = {512: 383, 1024: 437, 1536: 401}
_DECODE_AT = {512: 4_163_240, 1024: 4_136_708, 1536: 9_015_066}
_DECODE_S = 0.353 / 4_136_708
_EXTRACT = ("bench_reference_h100.json (warm runs at 512/1024/1536): 131 / 234 / 234 B/voxel, 0.156 s at "
            "4,136,708 voxels")


def _decoder(r: int) -> StageCost:
    return StageCost(transient_per_unit=_DECODE_BYTES[r], seconds_per_unit=_DECODE_S, measured_at=_DECODE_AT[r],
                     source=_DECODE.format(r=r, b=_DECODE_BYTES[r]))


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
    "shape_decoder": _decoder(1024),
    "tex_decoder": _decoder(1024),
    **{f"{stage}@{r}": _decoder(r) for stage in ("shape_decoder", "tex_decoder") for r in _DECODE_BYTES},
    # the LR latent decoded to its 512³ coordinates (levels 0-3 of the shape decoder, no output head)
    "upsample": StageCost(transient_per_unit=215_179, seconds_per_unit=0.080 / 4_144, measured_at=4_144,
                          source="bench_reference_h100.json, warm run at 1024: 0.89 GB, 0.080 s at 4,144 LR tokens"),
    # carried: the decoded fields it reads (int32 coords [4] + 7 half channels per voxel)
    "mesh_extraction": StageCost(carried_per_unit=4 * 4 + 7 * 2, transient_per_unit=234, seconds_per_unit=0.156 / 4_136_708,
                                 measured_at=4_136_708, source=_EXTRACT),
}
