"""`pixal3d-rt` command line."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .errors import Pixal3DError


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pixal3d-rt")
def main():
    """Pixal3D inference runtime: one image in, one textured PBR GLB out."""


@main.command()
@click.option("--image", "image_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Input image; RGBA with the background removed (or install rembg).")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .glb file.")
@click.option("--weights", type=click.Path(path_type=Path), help="Directory with the official weights (see README).")
@click.option("--preset", type=click.Choice(["tiny"]), help="Build every network small with seeded random weights (structural demo).")
@click.option("--resolution", type=click.Choice(["512", "1024", "1536"]), default="1024", show_default=True, help="512 = shape only; 1024/1536 = cascades with texture.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Sampling steps per stage (default: upstream's 12).")
@click.option("--fov", "fov_deg", type=click.FloatRange(1.0, 120.0), default=None, help="Horizontal field of view of the input photo in degrees (default 49.13°, upstream's default camera).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--texture-size", type=click.IntRange(64, 8192), default=None, help="Baked texture size (default 2048; tiny preset 256).")
@click.option("--decimation-target", type=click.IntRange(100, 10_000_000), default=None, help="Face count the mesh is simplified to (default 200000).")
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Engine directory from `pixal3d-rt export`: its networks run as TensorRT engines (CUDA) or AOTInductor packages (the device they were built for).")
@click.option("--backend", type=click.Choice(["eager", "cuda"]), default=None, help="Flow networks: eager reference, or the fast cuda backend (default on a GPU).")
@click.option("-q", "--quiet", is_flag=True, help="No per-stage progress.")
def infer(image_path, output_path, weights, preset, resolution, seed, steps, fov_deg, device, texture_size, decimation_target, engines_dir, backend, quiet):
    """Generate a textured 3D asset (GLB) from one image."""
    from .checkpoints import HOW_TO_GET_WEIGHTS

    if weights is None and preset is None:
        _fail("no weights given.\n" + HOW_TO_GET_WEIGHTS)
    if weights is not None and preset is not None:
        _fail("give either --weights or --preset, not both")
    if output_path.suffix.lower() != ".glb":
        _fail(f"{output_path}: the output must be a .glb file")
    if not output_path.parent.exists():
        _fail(f"{output_path.parent}: output directory does not exist")
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA GPU is visible to PyTorch")
    if engines_dir is not None and device != "cuda":
        from pixal3d_rt.runtime.tensorrt_engine import EngineError, read_manifest

        try:
            nets = read_manifest(engines_dir).get("networks", {})
        except EngineError as e:
            _fail(str(e))
        gpu_only = sorted(n for n, e in nets.items() if e.get("device") != "cpu")  # only AOTInductor CPU packages run here
        if gpu_only:
            _fail(f"--engines {engines_dir}: {', '.join(gpu_only)} run on an NVIDIA GPU (--device cuda), none is in use "
                  "(TensorRT engines and cuda AOTInductor packages)")

    def say(msg):
        if not quiet:
            click.echo(msg, err=True)

    from .pipeline import Pipeline
    from .preprocess import load_image

    t0 = time.perf_counter()
    try:
        image = load_image(image_path)  # fail on a bad image before loading gigabytes of weights
        if preset:
            say(f"[pixal3d-rt] preset '{preset}': every network is small with seeded random weights; "
                "the asset is a structural demo, not a reconstruction of the image.")
            pipe = Pipeline.from_preset(preset, device=device, progress=say, backend=backend)
        else:
            say(f"[pixal3d-rt] loading weights from {weights}")
            pipe = Pipeline.from_pretrained(weights, device=device, progress=say, resolution=int(resolution), backend=backend)
        if engines_dir is not None:
            from pixal3d_rt.runtime.tensorrt_engine import use_engines

            use_engines(pipe, engines_dir, progress=say)
        result = pipe.run(image, resolution=int(resolution), seed=seed, steps=steps, fov_deg=fov_deg, progress=say)
        stats = pipe.export_glb(result, output_path, texture_size=texture_size, decimation_target=decimation_target, progress=say)
    except Pixal3DError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no output written", 130)
    total = time.perf_counter() - t0
    click.echo(_summary(result, stats, output_path, total, preset))


@main.command("export")
@click.option("--weights", type=click.Path(path_type=Path), help="Directory with the official weights (see README).")
@click.option("--preset", type=click.Choice(["tiny"]), help="Export the embedded tiny preset (random weights; for tests).")
@click.option("--target", type=click.Choice(["tensorrt-rtx", "tensorrt", "aoti"]), default="tensorrt-rtx", show_default=True,
              help="tensorrt-rtx: portable engines for RTX GPUs (8.0/8.6/8.9/12.0), built without a GPU; tensorrt: full "
                   "TensorRT, built on and for the GPU of this machine; aoti: AOTInductor packages (.pt2) compiled for this "
                   "machine's GPU (or CPU) and tied to the installed torch version.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Engine directory (created).")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32", "fp8"]), default="bf16", show_default=True,
              help="Compute precision of the engines (bf16 = upstream's mixed precision; fp8 = the flows' block Linears "
                   "in FP8 E4M3 with calibrated scales, TensorRT targets, compute capability 8.9+; the SS decoder and "
                   "DINOv3 stay bf16).")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 22), default=None,
              help="Upper bound of the token count N of the sparse flows' profiles (default: the grid, 65,536 for the HR stages).")
@click.option("--only", default=None, help="Comma-separated networks: ss_flow, shape_flow_lr, shape_flow_hr, tex_flow, ss_decoder, dinov3_lr, dinov3_hr.")
@click.option("--compute-capability", "ccs", default=None, help="TensorRT-RTX: comma-separated compute capabilities (default 8.0,8.6,8.9,12.0; 8.9,12.0 with --precision fp8).")
@click.option("--force", is_flag=True, help="Rebuild engines even when they are up to date.")
@click.option("--keep-onnx", is_flag=True, help="Keep the ONNX files under OUT/onnx/.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="--target aoti: compile the packages for this device (default: cuda when available).")
@click.option("--verify", is_flag=True, help="Afterwards run each engine once against the eager network on this GPU; print error and time.")
@click.option("-q", "--quiet", is_flag=True, help="No per-network progress.")
def export_cmd(weights, preset, target, out_dir, precision, max_tokens, only, ccs, force, keep_onnx, device, verify, quiet):
    """Export the stage networks to TensorRT engines (through ONNX) or AOTInductor packages, one network at a time."""
    from .checkpoints import HOW_TO_GET_WEIGHTS

    if weights is None and preset is None:
        _fail("no weights given.\n" + HOW_TO_GET_WEIGHTS)
    if weights is not None and preset is not None:
        _fail("give either --weights or --preset, not both")
    if device is not None and target != "aoti":
        _fail(f"--device is for --target aoti; {target} engines are built for {'the GPUs of --compute-capability' if target == 'tensorrt-rtx' else 'this GPU'}")

    def say(msg):
        if not quiet:
            click.echo(msg, err=True)

    from pixal3d_rt.export.trt_build import Source, check_request, export_engines, verify_engines

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    caps = tuple(c.strip() for c in ccs.split(",") if c.strip()) if ccs else None
    t0 = time.perf_counter()
    try:
        check_request(target, precision)  # before any weights are read
        source = Source.from_preset(preset) if preset else Source.from_weights(weights)
        manifest = export_engines(source, target, out_dir, precision=precision, max_tokens=max_tokens, only=names,
                                  compute_capabilities=caps, force=force, keep_onnx=keep_onnx, device=device, progress=say)
        lines = ["", "network          engine MB   export s   build s   built at"]
        for name, e in sorted(manifest["networks"].items()):
            if names and name not in names:
                continue
            lines.append(f"  {name:<15} {e['bytes'] / 1e6:9.1f}  {e['export_seconds']:9.1f}  {e['build_seconds']:8.1f}   {e['built_at']}")
        if target == "aoti":  # packages are tied to torch and to the device they were compiled on
            where = (f"{manifest['gpu']} (compute capability {manifest['compute_capabilities'][0]})" if manifest["device"] == "cuda"
                     else f"cpu ({manifest['cpu_capability']})")
            built_for = f"torch {manifest['torch_version']}, {precision}, {where}"
        else:
            built_for = (f"{manifest['tensorrt_version']}, {precision}, compute capabilities "
                         f"{', '.join(manifest['compute_capabilities'])}")
        lines.append(f"{manifest['target']} {built_for}; {time.perf_counter() - t0:.1f} s; manifest {out_dir / 'manifest.json'}")
        click.echo("\n".join(lines))
        if verify:
            records = verify_engines(source, out_dir, only=names, progress=click.echo)
            if not all(r["ok"] for r in records):
                _fail("verification failed for " + ", ".join(r["network"] for r in records if not r["ok"]), 1)
    except Pixal3DError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; engines already written are complete and recorded, nothing is half-written", 130)


def _summary(result, stats, output_path, total, preset) -> str:
    lines = ["", "stage                      time (s)  detail"]
    for name, seconds, detail in result.timings + stats.get("timings", []):
        lines.append(f"  {name:<24} {seconds:8.2f}  {detail}")
    lines.append(f"  {'total':<24} {total:8.2f}")
    tok = result.tokens
    lines.append("tokens: " + ", ".join(f"{k} {v:,}" for k, v in tok.items()))
    lines.append(f"mesh: {stats['faces']:,} faces, {stats['vertices']:,} vertices; texture {stats.get('texture_size', '-')}")
    lines.append(f"wrote {output_path}" + ("  (tiny preset: structural demo)" if preset else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
