"""`pixal3d-rt` command line."""
from __future__ import annotations

import glob
import math
import sys
import time
from pathlib import Path

import click

from .bench_sections import SECTIONS as BENCH_SECTIONS
from .errors import Pixal3DError


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class _OneLineErrors(click.Group):
    """Usage errors (a bad option value, a missing option) as one `error: ...` line, exit status 2,
    where click prints the usage and a hint on three."""

    def main(self, *args, **kwargs):
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare `pixal3d-rt`: the help, as click shows it
                click.echo(e.format_message(), err=True)
                sys.exit(e.exit_code)
            where = e.ctx.command_path if e.ctx is not None else "pixal3d-rt"
            _fail(f"{e.format_message()} (see {where} --help)", e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pixal3d-rt")
def main():
    """Pixal3D inference runtime: one image in, one textured PBR GLB out."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class Degrees(click.ParamType):
    """A finite field of view in degrees (click's FloatRange lets NaN through)."""

    name = "degrees"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or not 1.0 <= v <= 120.0:
            hint = f" (if {value} is in radians, that is --fov {math.degrees(v):.2f})" if 0 < v < 3.2 else ""
            self.fail(f"{value} is not a field of view in degrees between 1 and 120{hint}", param, ctx)
        return v


def _expand_images(specs) -> list[Path]:
    """--image values: files, folders (their images, sorted) and glob patterns, in the order given."""
    out = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                _fail(f"--image {spec}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif any(ch in spec for ch in "*?[") and not p.exists():
            found = sorted(Path(q) for q in glob.glob(spec) if Path(q).is_file())
            if not found:
                _fail(f"--image {spec}: the pattern matches no file")
            out += found
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _outputs(images: list[Path], output_path, output_dir) -> list[Path]:
    if output_path is not None and output_dir is not None:
        _fail("give either --output (one image) or --output-dir, not both")
    if output_path is None and output_dir is None:
        _fail("no output given: --output FILE.glb for one image, --output-dir DIR for several")
    if output_path is not None:
        if len(images) > 1:
            _fail(f"{len(images)} images and one --output: use --output-dir DIR to write one GLB per image")
        if output_path.suffix.lower() != ".glb":
            _fail(f"{output_path}: the output must be a .glb file")
        return [output_path]
    outs = [output_dir / (img.stem + ".glb") for img in images]
    dupes = sorted({o.name for o in outs if outs.count(o) > 1})
    if dupes:
        _fail(f"--output-dir {output_dir}: several images would write {dupes[0]}; rename one of them")
    return outs


class Budget(click.ParamType):
    """Device memory in GiB (a finite positive number) or "auto" (the device's free memory)."""

    name = "GiB|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of GiB or 'auto'", param, ctx)
        if not math.isfinite(v) or not 0.001 <= v <= 4096:
            self.fail(f"{value} is not a memory budget between 0.001 and 4096 GiB", param, ctx)
        return v


def _source_options(f):
    f = click.option("--weights", metavar="DIR|HUB_ID", default=None,
                     help="Official weights: a directory in the official layout, or a Hugging Face id "
                          "(TencentARC/Pixal3D; downloaded on first use into the Hugging Face cache).")(f)
    return click.option("--preset", type=click.Choice(["tiny"]), help="Build every network small with seeded random weights (structural demo).")(f)


def _check_source(weights, preset):
    if weights is None and preset is None:
        from .checkpoints import HOW_TO_GET_WEIGHTS  # imports torch: only here

        _fail("no weights given.\n" + HOW_TO_GET_WEIGHTS)
    if weights is not None and preset is not None:
        _fail("give either --weights or --preset, not both")


@main.command()
@click.option("--image", "images", multiple=True, required=True, metavar="PATH",
              help="Input image (RGBA with the background removed, or RGB with rembg installed); a folder of images or a glob "
                   "pattern; repeat for several.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Output .glb file (one image).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for several images: one <image name>.glb each (created if missing).")
@_source_options
@click.option("--resolution", type=click.Choice(["512", "1024", "1536"]), default="1024", show_default=True, help="512 = shape only; 1024/1536 = cascades with texture.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=42, show_default=True, help="Noise seed; each image of a batch uses it as a run of its own would.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Sampling steps per stage (default: upstream's 12).")
@click.option("--fov", "fov_deg", type=Degrees(), default=None, help="Horizontal field of view of the input photo in degrees (default 49.13°, upstream's default camera).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--export", "export_mode", type=click.Choice(["fast", "upstream"]), default="fast", show_default=True,
              help="fast: the decoded surface simplified (200k faces, 2048² PNG); upstream: as Pixal3D's inference.py "
                   "(narrow-band remesh, 1M faces, 4096² webp, single-sided).")
@click.option("--texture-size", type=click.IntRange(64, 8192), default=None, help="Baked texture size (default: the --export mode's; tiny preset 256).")
@click.option("--decimate", "--decimation-target", "decimation_target", type=click.IntRange(100, 10_000_000), default=None,
              help="Face count the mesh is simplified to (default: the --export mode's; tiny preset 20000).")
@click.option("--texture-format", type=click.Choice(["png", "webp"]), default=None,
              help="Texture images: png (every viewer) or webp (EXT_texture_webp); default: the --export mode's.")
@click.option("--preview", is_flag=True, help="Also write <output>.preview.png: four rendered views of the GLB.")
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Engine directory from `pixal3d-rt export`: its networks run as TensorRT engines (CUDA) or AOTInductor packages (the device they were built for).")
@click.option("--backend", type=click.Choice(["eager", "cuda"]), default=None, help="Flow networks: eager reference, or the fast cuda backend (default on a GPU).")
@click.option("--vram-budget", type=Budget(), default=None,
              help="GiB of GPU memory the run must stay inside (the whole process: CUDA context included); the weights stay "
                   "on the host and each stage gets them resident, for its duration, or streamed block by block "
                   "(see `pixal3d-rt plan`). 'auto': the free memory. Default: everything resident.")
@click.option("--host-budget", type=Budget(), default=None,
              help="With --vram-budget and --weights: GiB of host memory for the flow and decoder weights; they are read "
                   "from their files per stage and the least recently used dropped (read again when needed).")
@click.option("--max-image-pixels", type=click.IntRange(1, 1 << 40), default=None,
              help="Refuse input images with more pixels than this before decoding them (default 64,000,000).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output (errors and the summary only).")
def infer(images, output_path, output_dir, weights, preset, resolution, seed, steps, fov_deg, device, export_mode, texture_size,
          decimation_target, texture_format, preview, engines_dir, backend, vram_budget, host_budget, max_image_pixels, quiet):
    """Generate a textured 3D asset (GLB) from each image.

    Everything that can be checked is checked before a network is built: options, output paths,
    images (and the background remover an RGB image needs), every weights file's header."""
    from .preprocess import MAX_PIXELS

    _check_source(weights, preset)
    image_paths = _expand_images(images)
    outs = _outputs(image_paths, output_path, output_dir)
    batch = output_dir is not None
    from .files import check_writable
    from .preprocess import check_image, load_image
    from .progress import ConsoleProgress, Progress

    say = Progress() if quiet else ConsoleProgress()
    if fov_deg is not None and fov_deg < 3.2:
        click.echo(f"hint: --fov {fov_deg:g} is read in degrees; if you meant radians, that is --fov {math.degrees(fov_deg):.2f}", err=True)
    results = []  # (image, output, error or None, stats)
    jobs = []
    try:
        for img_path, out in zip(image_paths, outs):
            check_writable(out, create_parents=batch)
        for img_path, out in zip(image_paths, outs):  # every image before any weights are read
            try:
                img = load_image(img_path, max_image_pixels or MAX_PIXELS)
                check_image(img, str(img_path))
                jobs.append((img_path, img, out))
            except Pixal3DError as e:
                if not batch:
                    raise
                say.note(f"error: {e}")
                results.append((img_path, out, str(e), None))
        if not jobs:
            _fail("no usable image: " + "; ".join(r[2] for r in results))
        device = _check_device(device)  # torch is imported from here on
        if engines_dir is not None:
            _check_engines(engines_dir, device)
        if host_budget is not None and (vram_budget is None or weights is None):
            _fail("--host-budget needs --vram-budget and --weights (the weights files are read per stage)")
        pipe = _load_pipeline(weights, preset, device, int(resolution), backend, engines_dir, say, vram_budget, host_budget)
        if vram_budget is not None:  # no plan fits: say so before any image runs
            say.note("plan:\n" + _plan_text(pipe.plan(int(resolution), vram_budget)))
    except Pixal3DError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no output written", 130)

    for img_path, img, out in jobs:
        t0 = time.perf_counter()
        if batch:
            say.note(f"== {img_path} → {out}")
        try:
            result = pipe.run(img, resolution=int(resolution), seed=seed, steps=steps, fov_deg=fov_deg, progress=say)
            stats = result.save_glb(out, texture_size=texture_size, decimation_target=decimation_target, progress=say,
                                    export=export_mode, texture_format=texture_format,
                                    preview=out.with_suffix(".preview.png") if preview else None)
        except Pixal3DError as e:
            if not batch:
                _fail(str(e))
            say.note(f"error: {img_path}: {e}")
            results.append((img_path, out, str(e), None))
            continue
        except KeyboardInterrupt:
            _fail(f"interrupted; {out} not written", 130)
        stats["seconds"] = time.perf_counter() - t0
        results.append((img_path, out, None, stats))
        if not batch:
            click.echo(_summary(pipe, result, stats, out, preset))
    if batch:
        click.echo(_batch_summary(pipe, results, preset))
        if any(r[2] for r in results):
            sys.exit(1)


def _check_device(device):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA GPU is visible to PyTorch")
    return device


def _check_engines(engines_dir, device):
    """The engine directory intact and built by the installed versions; on the CPU, only CPU packages."""
    from pixal3d_rt.runtime.tensorrt_engine import EngineError, check_engines

    try:
        nets = check_engines(engines_dir).get("networks", {})
    except EngineError as e:
        _fail(str(e))
    if device == "cuda":
        return
    gpu_only = sorted(n for n, e in nets.items() if e.get("device") != "cpu")  # only AOTInductor CPU packages run here
    if gpu_only:
        _fail(f"--engines {engines_dir}: {', '.join(gpu_only)} run on an NVIDIA GPU (--device cuda), none is in use "
              "(TensorRT engines and cuda AOTInductor packages)")


def _host_gib(host_budget):
    if host_budget != "auto":
        return host_budget
    from .pipeline import host_available_bytes

    return host_available_bytes() / 2**30


def _load_pipeline(weights, preset, device, resolution, backend, engines_dir, say, vram_budget=None, host_budget=None):
    from .pipeline import Pipeline

    if preset:
        say.note(f"[pixal3d-rt] preset '{preset}': every network is small with seeded random weights; "
                 "the asset is a structural demo, not a reconstruction of the image.")
        pipe = Pipeline.from_preset(preset, device=device, progress=say, backend=backend, vram_budget=vram_budget)
        if vram_budget is not None and not pipe.stage_costs:
            say.note(f"[pixal3d-rt] measuring the '{preset}' networks' stage costs on {device} for the plan")
            from .pipeline import calibration_image

            pipe.calibrate(calibration_image(), resolution, steps=2)
    else:
        pipe = Pipeline.from_pretrained(weights, device=device, progress=say, resolution=resolution, backend=backend,
                                        vram_budget=vram_budget, host_budget=_host_gib(host_budget))
    if engines_dir is not None:
        from pixal3d_rt.runtime.tensorrt_engine import use_engines

        use_engines(pipe, engines_dir, progress=say.note)
    return pipe


def _plan_text(plan) -> str:
    from .runtime.planner import format_plan

    return format_plan(plan)


@main.command("plan")
@click.option("--vram-budget", type=Budget(), required=True, help="GiB of GPU memory for the whole process ('auto': the free memory).")
@click.option("--resolution", type=click.Choice(["512", "1024", "1536"]), default="1024", show_default=True)
@click.option("--tokens", type=click.IntRange(1, 1 << 20), default=None,
              help="HR token count to plan for (default: the measured reference object's, scaled with the resolution).")
@click.option("--preset", type=click.Choice(["reference", "tiny"]), default="reference", show_default=True,
              help="reference: the official networks' sizes (the official weights have them); tiny: the tiny preset's, "
                   "its stage costs measured now on this machine's CPU.")
@click.option("--backend", type=click.Choice(["cuda", "eager"]), default="cuda", show_default=True)
@click.option("--overhead", type=click.FloatRange(0, 64), default=None,
              help="GiB the process holds outside torch (CUDA context, libraries); default: measured on this GPU, "
                   "else 0.5 GiB (0 for the tiny preset on the CPU).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the plan as JSON.")
def plan_cmd(vram_budget, resolution, tokens, preset, backend, overhead, json_path):
    """Print the memory plan of a run: per stage, where each network's weights are (resident on the
    device, loaded for the stage, or streamed block by block), how its work is chunked, the predicted
    peak device memory and time. Stages marked * have no measured cost on this device."""
    import json

    from .pipeline import plan_offline

    try:
        plan = plan_offline(preset, int(resolution), vram_budget, backend=backend, tokens=tokens, overhead_gib=overhead)
    except Pixal3DError as e:
        _fail(str(e))
    text = _plan_text(plan)
    if json_path is not None:
        from .files import atomic_write

        atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(plan.to_dict(), indent=2)))
    click.echo(text)


@main.command()
@_source_options
@click.option("--resolution", type=click.Choice(["512", "1024", "1536"]), default="1024", show_default=True,
              help="512 needs only the shape networks; 1024/1536 the texture networks too.")
@click.option("--image", "images", multiple=True, metavar="PATH", help="Also check these images (readable; alpha or a working background remover).")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also check that this .glb can be written.")
def check(weights, preset, resolution, images, output_path):
    """Check weights (and images, an output path) without loading a network: every file present,
    every config and safetensors header against the network it describes. Exit 0 when all is well."""
    from .checkpoints import check_weights, locate_weights, wanted_models, HIRES_ONLY
    from .files import check_writable
    from .preprocess import check_image, load_image

    _check_source(weights, preset)
    lines = []
    try:
        if output_path is not None:
            if output_path.suffix.lower() != ".glb":
                _fail(f"{output_path}: the output must be a .glb file")
            check_writable(output_path)
            lines.append(f"output  {output_path}: writable")
        for spec in _expand_images(images):
            img = load_image(spec)
            check_image(img, str(spec))
            lines.append(f"image   {spec}: {img.width}×{img.height} {img.mode}, usable")
        if weights is not None:
            need = None if resolution != "512" else set(k for k in wanted_models(None) if k not in HIRES_ONLY)
            files = locate_weights(weights, need=need)
            rows = check_weights(files, need)
            lines.append(f"weights {files.source}: {len(rows)} networks, {sum(r['bytes'] for r in rows) / 1e9:.2f} GB, "
                         f"{sum(r['parameters'] for r in rows) / 1e9:.2f} B parameters; every header matches its network")
            for r in rows:
                lines.append(f"  {r['network']:<28} {r['class']:<26} {r['parameters'] / 1e6:9.1f} M  {r['file']}")
        else:
            lines.append(f"preset  {preset}: built in memory, nothing to check on disk")
    except Pixal3DError as e:
        _fail(str(e))
    click.echo("\n".join(lines + ["ok"]))


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
@click.option("--only", default=None, help="Comma-separated networks: ss_flow, shape_lr_flow, shape_hr_flow, tex_flow, ss_decoder, dinov3_lr, dinov3_hr.")
@click.option("--compute-capability", "ccs", default=None, help="TensorRT-RTX: comma-separated compute capabilities (default 8.0,8.6,8.9,12.0; 8.9,12.0 with --precision fp8).")
@click.option("--force", is_flag=True, help="Rebuild engines even when they are up to date.")
@click.option("--keep-onnx", is_flag=True, help="Keep the ONNX files under OUT/onnx/.")
@click.option("--weight-streaming/--no-weight-streaming", default=True, show_default=True,
              help="TensorRT targets: build the flow transformers with weight streaming, so that a --vram-budget plan "
                   "can keep part of their weights in host memory.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="--target aoti: compile the packages for this device (default: cuda when available).")
@click.option("--verify", is_flag=True, help="Afterwards run each engine once against the eager network on this GPU; print error and time.")
@click.option("-q", "--quiet", is_flag=True, help="No per-network progress.")
def export_cmd(weights, preset, target, out_dir, precision, max_tokens, only, ccs, force, keep_onnx, weight_streaming, device,
               verify, quiet):
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

    from .files import check_writable

    try:
        check_writable(out_dir / "manifest.json", create_parents=True)
    except Pixal3DError as e:
        _fail(str(e))
    from pixal3d_rt.export.trt_build import Source, check_request, export_engines, verify_engines

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    caps = tuple(c.strip() for c in ccs.split(",") if c.strip()) if ccs else None
    t0 = time.perf_counter()
    try:
        check_request(target, precision)  # before any weights are read
        source = Source.from_preset(preset) if preset else Source.from_weights(weights)
        manifest = export_engines(source, target, out_dir, precision=precision, max_tokens=max_tokens, only=names,
                                  compute_capabilities=caps, force=force, keep_onnx=keep_onnx, device=device,
                                  weight_streaming=weight_streaming, progress=say)
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


@main.command("download")
@click.option("--repo", default="TencentARC/Pixal3D", show_default=True, help="Hugging Face id of the Pixal3D weights.")
@click.option("--dir", "dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also lay the files out here as a weights directory (--weights DIR; copy it to a machine without "
                   "internet). Default: only the Hugging Face cache (and torch's hub cache for NAF).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def download_cmd(repo, dest, quiet):
    """Fetch all weights (Pixal3D's networks, TRELLIS's SS decoder, DINOv3, NAF; about 24 GB) and verify them."""
    from .hub import cache_dir, download

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    t0 = time.perf_counter()
    try:
        files = download(repo, dest, progress=None if quiet else (lambda msg: click.echo(msg, err=True)))
    except Pixal3DError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; finished files stay in the cache, run the command again to resume", 130)
    rows = [("pipeline.json", files.pipeline_json)]
    rows += [(key, base.parent / (base.name + ".safetensors")) for key, base in files.models.items()]
    rows += [("dinov3", files.dinov3_dir / "model.safetensors"), ("naf", files.naf)]
    lines = ["", f"{'file':<28} {'MB':>9}  path"]
    lines += [f"  {name:<26} {p.stat().st_size / 1e6:9.1f}  {p}" for name, p in rows]
    total = sum(p.stat().st_size for _, p in rows)
    lines.append(f"{repo}: {len(rows)} files, {total / 1e9:.2f} GB, verified, in {time.perf_counter() - t0:.1f} s")
    if dest is not None:
        lines.append(f"weights directory {dest} (copy it to a machine without internet); next:")
        lines.append(f"  pixal3d-rt infer --image IMAGE --output out.glb --weights {dest}")
    else:
        lines.append(f"in the Hugging Face cache {cache_dir()} and torch's hub cache {files.naf.parent}; next:")
        lines.append(f"  pixal3d-rt infer --image IMAGE --output out.glb --weights {repo}   (offline: HF_HUB_OFFLINE=1)")
    click.echo("\n".join(lines))


def _summary(pipe, result, stats, output_path, preset) -> str:
    lines = ["", "stage                      time (s)  detail"]
    rows = [("load", pipe.load_seconds, "networks")] + result.timings + stats.get("timings", [])
    for name, seconds, detail in rows:
        lines.append(f"  {name:<24} {seconds:8.2f}  {detail}")
    lines.append(f"  {'total':<24} {sum(r[1] for r in rows):8.2f}")
    tok = result.tokens
    lines.append("tokens: " + ", ".join(f"{k} {v:,}" for k, v in tok.items()))
    texture = f"{stats['texture_size']}²" if stats.get("texture_size") else "none (shape only)"
    lines.append(f"mesh: {stats['faces']:,} faces, {stats['vertices']:,} vertices; texture {texture}")
    if stats.get("texture_size"):
        lines.append(f"texture: {stats['coverage']:.0%} of texels baked, {stats.get('charts', 0):,} charts, "
                     f"{stats.get('texels_per_voxel', 0.0):.2f} texels per voxel side"
                     + ("; closed" if stats.get("closed") else "; open") + ("; double-sided" if stats.get("double_sided") else "; single-sided"))
    lines.append(f"wrote {output_path}" + ("  (tiny preset: structural demo)" if preset else ""))
    if stats.get("preview"):
        lines.append(f"preview {stats['preview']}")
    return "\n".join(lines)


def _batch_summary(pipe, results, preset) -> str:
    lines = ["", f"load {pipe.load_seconds:.2f} s", "image                            result"]
    for img, out, err, stats in results:
        if err:
            lines.append(f"  {str(img):<30} FAILED: {err}")
        else:
            lines.append(f"  {str(img):<30} {stats['seconds']:7.2f} s  {stats['faces']:,} faces  → {out}")
    ok = sum(1 for r in results if not r[2])
    lines.append(f"{ok} of {len(results)} images written" + ("  (tiny preset: structural demo)" if preset else ""))
    return "\n".join(lines)


from .serve import serve  # noqa: E402  (the web page; Gradio is imported when it runs)

main.add_command(serve)

@main.command("bench")
@click.option("--preset", type=click.Choice(["reference", "tiny"]), default=None,
              help="reference: full-size networks, random weights, a reference shape's structure (assets are not real generations); tiny: small networks.")
@click.option("--weights", metavar="DIR|HUB_ID", default=None, help="Official weights instead of a preset.")
@click.option("--resolution", "resolutions", type=click.Choice(["512", "1024", "1536"]), multiple=True, help="Repeatable (default 1024); each runs in a fresh process.")
@click.option("--images", "images", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Input images (repeatable; default: examples/mug.png).")
@click.option("--runs", type=click.IntRange(1, 100), default=2, show_default=True, help="Runs per resolution: the first is cold, the rest warm.")
@click.option("--backend", type=click.Choice(["eager", "cuda"]), default=None, help="Flow networks (default: cuda on a GPU).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Sampling steps per stage (default 12).")
@click.option("--vram-budget", "budgets", default="", metavar="GB,GB,...", help="Also run per budget (GiB) with the process held inside it, e.g. 6,8,12,16,24.")
@click.option("--budget-runs", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Runs per budget: the first places the weights from the host, the rest keep what the plan keeps resident; "
              "the time ratio is the last run's.")
@click.option("--host-budget", "host_budget", type=click.FloatRange(0.1, 4096), default=None, metavar="GB",
              help="Budget runs read the networks per stage from their files into host memory of this size "
              "(a preset's are written in the official layout to a temporary folder first).")
@click.option("--gpu-profile", "profiles", multiple=True, type=click.Choice(["rtx3060-12gb", "rtx4070-12gb", "rtx4080-16gb", "rtx4090-24gb", "rtx5090-32gb"]),
              help="Run at that card's memory and add a roofline projection of each stage's time (labelled projection).")
@click.option("--glb-runs", type=click.IntRange(0, 100), default=None, help="How many runs per resolution go on to the GLB export (default: all).")
@click.option("--quality", is_flag=True, help="Also run the fp32 eager path and each fast path once and report each stage "
              "output's relative error and the mesh's Chamfer distance and F-score against fp32 eager (extra runs).")
@click.option("--quality-engines", "quality_engines", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --quality: an engine directory (pixal3d-rt export) whose networks make the `engines` path.")
@click.option("--upstream", "upstream_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A folder holding upstream's `pixal3d` package (never part of this repository): also run its modules "
              "stage by stage on the same inputs and weights and report ours/upstream per stage.")
@click.option("--section", "sections", multiple=True, type=click.Choice(list(BENCH_SECTIONS)),
              help="Instead of the pipeline, run a micro-benchmark section (repeatable), each in a fresh process, writing "
              "OUT/<kind>_<gpu>.json: " + "; ".join(f"{s.name}: {s.about}" for s in BENCH_SECTIONS.values()) + ".")
@click.option("--section-arg", "section_args", multiple=True, metavar="ARG",
              help="An option passed to the sections named (repeatable), e.g. --section-arg=--quick; --section-arg=--help lists them.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"), show_default=True,
              help="Folder for bench.json, bench.md and the charts.")
def bench_cmd(preset, weights, resolutions, images, runs, backend, device, seed, steps, budgets, budget_runs, host_budget, profiles, glb_runs, quality,
              quality_engines, upstream_dir, sections, section_args, out_dir):
    """Time and measure every stage from image to GLB (cold, warm, memory budgets); JSON, Markdown, charts.
    With --section: a micro-benchmark section instead."""
    if section_args and not sections:
        _fail("--section-arg passes options to a --section: name the section")
    if sections:
        _bench_sections(sections, section_args, preset or weights, device, upstream_dir, out_dir)
        return
    if (preset is None) == (weights is None):
        _fail("give --preset reference|tiny or --weights DIR")
    if quality_engines is not None:
        if not quality:
            _fail("--quality-engines is the engines path of --quality: give --quality too")
        _check_engines(quality_engines, _check_device(device))
    if upstream_dir is not None:
        from .bench_upstream import check as check_upstream

        reason = check_upstream(upstream_dir)  # in a fresh process: importing it here would leave it in this one
        if reason:
            _fail(f"--upstream: {reason}")
    try:
        budget_list = [float(b) for b in budgets.replace(" ", "").split(",") if b]
    except ValueError:
        _fail(f"--vram-budget {budgets}: expected GiB numbers separated by commas, e.g. 6,8,12")
    if (budget_list or profiles) and device == "cpu":
        _fail("--vram-budget and --gpu-profile need a CUDA device")
    if host_budget is not None and not budget_list:
        _fail("--host-budget is the budget runs' host memory: give --vram-budget too")
    from .bench import run_bench

    if preset == "reference":
        click.echo("[pixal3d-rt] preset 'reference': full-size networks with seeded random weights and a reference shape's "
                   "structure; timings and memory are real, the assets are not generations.", err=True)
    report = run_bench(preset=preset, weights=weights, resolutions=[int(r) for r in resolutions] or [1024], images=images,
                       runs=runs, backend=backend, out_dir=out_dir, device=device, seed=seed, steps=steps,
                       budgets_gib=budget_list, budget_runs=budget_runs, host_budget_gib=host_budget, gpu_profiles=profiles, glb_runs=glb_runs, quality=quality, engines=quality_engines,
                       upstream=upstream_dir)
    click.echo((out_dir / "bench.md").read_text())
    failed = [p["resolution"] for p in report["resolutions"] if "error" in p]
    click.echo(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}" + "".join(f", {out_dir / c}" for c in report.get("charts", [])))
    if failed:
        _fail(f"resolution {', '.join(map(str, failed))} failed (see above)", 1)


def _bench_sections(names, section_args, source, device, upstream_dir, out_dir):
    from .bench_sections import refusal, run_section

    if source:
        _fail("--section runs a section instead of the pipeline: leave out --preset/--weights")
    if upstream_dir is not None:
        if not any(BENCH_SECTIONS[n].upstream for n in names):
            _fail(f"--upstream with --section is for {', '.join(n for n, s in BENCH_SECTIONS.items() if s.upstream)}")
        from .bench_upstream import check as check_upstream

        reason = check_upstream(upstream_dir)
        if reason:
            _fail(f"--upstream: {reason}")
    import torch

    cuda = device != "cpu" and torch.cuda.is_available()
    for name in names:
        reason = refusal(BENCH_SECTIONS[name], section_args, cuda)
        if reason:
            _fail(reason)
    failed = []
    for name in names:
        r = run_section(BENCH_SECTIONS[name], out_dir, section_args, upstream_dir)
        click.echo(f"section {name}: " + (", ".join(r["files"]) or "no result file written")
                   + ("" if r["status"] == 0 else f" (exited with status {r['status']})"))
        if r["status"] != 0:
            failed.append(name)
    if failed:
        _fail(f"section {', '.join(failed)} failed (see above)", 1)


if __name__ == "__main__":
    main()
