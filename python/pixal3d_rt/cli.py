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
@click.option("-q", "--quiet", is_flag=True, help="No per-stage progress.")
def infer(image_path, output_path, weights, preset, resolution, seed, steps, fov_deg, device, texture_size, decimation_target, quiet):
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
            pipe = Pipeline.from_preset(preset, device=device, progress=say)
        else:
            say(f"[pixal3d-rt] loading weights from {weights}")
            pipe = Pipeline.from_pretrained(weights, device=device, progress=say, resolution=int(resolution))
        result = pipe.run(image, resolution=int(resolution), seed=seed, steps=steps, fov_deg=fov_deg, progress=say)
        stats = pipe.export_glb(result, output_path, texture_size=texture_size, decimation_target=decimation_target, progress=say)
    except Pixal3DError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no output written", 130)
    total = time.perf_counter() - t0
    click.echo(_summary(result, stats, output_path, total, preset))


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
