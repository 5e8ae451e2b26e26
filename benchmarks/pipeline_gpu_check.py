"""The pipeline on a CUDA GPU: the tiny preset end to end (image → decoded mesh and PBR voxels, no
GLB: the GPU machine has no trimesh), with the decoders in fp16 as upstream runs them, checking that
the custom kernels are the ones that run and that every output is finite; timings per stage.

    python benchmarks/pipeline_gpu_check.py            (writes benchmarks/results/pipeline_gpu_check_<gpu>.json)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_package()

import torch  # noqa: E402

from pixal3d_rt.pipeline import Pipeline  # noqa: E402
from pixal3d_rt.preprocess import load_image  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug.png"


def _count(module, name, counts):
    fn = getattr(module, name)

    def wrapped(*a, **k):
        counts[name] = counts.get(name, 0) + 1
        return fn(*a, **k)

    setattr(module, name, wrapped)


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    counts = {}
    import pixal3d_rt.kernels.sparse_conv_triton as spc
    import pixal3d_rt.kernels.backproject_triton as bp
    import pixal3d_rt.kernels.na2d_triton as na

    for mod, names in ((spc, ["subm_conv3d_triton"]), (bp, ["backproject"]), (na, ["na2d_at_triton"])):
        for n in names:
            _count(mod, n, counts)
    pipe = Pipeline.from_preset("tiny", device="cuda")  # default backend on CUDA: cuda
    for key in ("shape_slat_decoder", "tex_slat_decoder"):
        pipe.models[key].convert_to_fp16()  # upstream's decoder precision: exercises the fp16 Triton conv
    warm = pipe._warm_up_decoder_kernels()
    image = load_image(EXAMPLE)
    eager = Pipeline(pipe.w, device="cuda", geometry=pipe.geometry, preset="tiny", backend="eager")
    rows = []
    for rep, p in enumerate((eager, pipe, pipe)):  # eager; cuda cold (one-time compiles, graph capture); cuda warm
        torch.cuda.reset_peak_memory_stats()
        r = p.run(image, resolution=1024, seed=42)
        if rep == 0:
            r_eager = r
        peak = torch.cuda.max_memory_allocated() / 1e9
        rows.append({"run": ["eager", "cuda_cold", "cuda_warm"][rep], "backend": p.backend, "timings": [(n, round(s, 4), d) for n, s, d in r.timings], "tokens": r.tokens,
                     "peak_gb": peak, "faces": int(r.faces.shape[0])})
    same_tokens = r.tokens == r_eager.tokens
    a, b = r.latents["shape_slat"].feats.float(), r_eager.latents["shape_slat"].feats.float()
    rel = float((a - b).norm() / b.norm()) if same_tokens else None
    finite = bool(torch.isfinite(r.vertices).all() and torch.isfinite(r.voxel_attrs).all())
    in_range = bool((r.voxel_attrs >= -1e-3).all() and (r.voxel_attrs <= 1.001).all()) if r.voxel_attrs is not None else None
    result = {"warm_up_s": warm, "runs": rows, "finite": finite, "kernel_calls": counts, "cuda_vs_eager": {"same_tokens": same_tokens, "shape_slat_rel_l2": rel},
              "faces": int(r.faces.shape[0]), "voxels": int(r.voxel_attrs.shape[0])}
    result = {"environment": common.environment(), "settings": {"preset": "tiny", "resolution": 1024, "seed": 42, "decoders": "fp16"}, **result}
    name = "pipeline_gpu_check_" + result["environment"].get("gpu", "gpu").split()[-1].lower()
    common.write_result(name, result)
    print(f"cuda vs eager backend: same tokens {same_tokens}, shape_slat rel L2 {rel}")
    print(f"finite={finite} faces={result['faces']} voxels={result['voxels']} kernel calls={counts}")
    for row in rows:
        print(f"run {row['run']}: total {sum(t[1] for t in row['timings']):.2f} s, peak {row['peak_gb']:.2f} GB")
        for n, s, d in row["timings"]:
            print(f"   {n:<16} {s:8.3f}  {d}")
    ok = finite and all(counts.get(k, 0) > 0 for k in ("subm_conv3d_triton", "backproject"))
    print("OK" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
