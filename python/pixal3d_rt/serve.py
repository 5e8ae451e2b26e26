"""`pixal3d-rt serve`: a web page (Gradio) over the Python API: upload an image, see the crop the
networks get, choose the settings, follow the stages live, look at the asset with its PBR textures
and download the GLB. The networks are loaded once per server; one generation runs at a time.

cli.py registers `serve` (this module imports nothing from cli at import time, so either can be
imported first); Gradio is imported only when the command runs. No `from __future__ import annotations`:
Gradio reads the handlers' annotations (gr.Request, gr.Progress) as objects."""
import atexit
import errno
import gc
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import click

from .errors import Pixal3DError
from .mesh.modes import DEFAULT_MODE, EXPORT_MODES
from .progress import Progress

WEB_INSTALL = "pip install 'pixal3d-rt[web]' (in a checkout: pip install -e '.[web]')"
TEXTURE_SIZES = (128, 256, 512, 1024, 2048, 4096)
# Gradio's 3D viewer (Babylon.js) takes WebGPU whenever a Chromium browser exposes navigator.gpu, and
# stays blank where no adapter comes (no GPU, a blocklisted driver): then hide WebGPU, so it takes WebGL.
WEBGL_FALLBACK = """<script>
if (navigator.gpu) navigator.gpu.requestAdapter().then((a) => { if (!a) delete Navigator.prototype.gpu; },
                                                       () => { delete Navigator.prototype.gpu; });
</script>"""


class Cancelled(Exception):
    """Stop was pressed: raised from a progress callback, so the run ends at its next step."""


class PageProgress(Progress):
    """Pipeline events → Gradio's progress bar (stage, step i/n); a set `cancel` ends the run at the
    next event, in the thread that runs it (Gradio can stop waiting for a thread, not stop it)."""

    def __init__(self, bar, cancel: threading.Event):
        self.bar, self.cancel = bar, cancel

    def _check(self):
        if self.cancel.is_set():
            raise Cancelled()

    def stage(self, name, detail=""):
        self._check()
        self.bar(0.0, desc=f"{name} {detail}".strip())

    def step(self, name, i, n):
        self._check()
        self.bar((i, n), desc=f"{name}: step {i}/{n}", unit="steps")

    def stage_done(self, name, seconds, detail=""):
        self._check()

    def note(self, text):
        self._check()


def _error_line(e: BaseException, path=None) -> str:
    """The project's one-line message; the server's upload paths (whole or cut short inside a quoted
    decoder message) shown as the file's own name."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if path:
        msg = msg.replace(str(path), Path(path).name)
        msg = re.sub(re.escape(str(Path(path).parent.parent)) + r"[^\s'\"):;,]*", Path(path).name, msg)
    return f"error: {msg}"


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB (GPU, this run)"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB (server process, peak RSS)"  # KiB on Linux
    except ImportError:
        return "n/a"


class Server:
    """The page's handlers around one loaded Pipeline."""

    def __init__(self, pipe, root: Path, max_pixels: int, preset: str | None):
        self.pipe, self.root, self.max_pixels, self.preset = pipe, root, max_pixels, preset
        self.lock = threading.Lock()  # one generation at a time, also while a stopped run reaches its next step
        self.running: dict[str, threading.Event] = {}  # session → cancel flag of its current run

    def new_session_dir(self) -> str:
        return str(self.root / "sessions" / uuid.uuid4().hex)

    def upload(self, file, session_dir):
        """Check the upload with the CLI's checks and show the crop the networks will see."""
        from .preprocess import check_image, load_image, preprocess_image

        if file is None:
            return None, None, "", session_dir
        name = Path(file).name
        try:
            img = load_image(file, self.max_pixels)  # size checked from the header before decoding
            check_image(img, name)
            crop = preprocess_image(img)
        except Pixal3DError as e:
            return None, None, _error_line(e, file), session_dir
        except Exception as e:  # a decoder failure the checks did not foresee: one line here, the traceback in the log
            traceback.print_exc()
            return None, None, _error_line(e, file), session_dir
        note = f"{name}: {img.width}×{img.height} {img.mode}; above, the crop the networks see"
        return crop, crop, note, session_dir or self.new_session_dir()

    def stop(self, request) -> str:
        ev = self.running.get(request.session_hash)
        if ev is not None:
            ev.set()
        return "stopped"

    def generate(self, image, resolution, seed, steps, fov, texture_size, faces, session_dir, request, bar,
                 export="fast", texture_format=""):
        import gradio as gr
        import torch

        keep = (gr.skip(), gr.skip(), gr.skip())  # a failed or stopped run leaves the last result in place
        if image is None:
            return *keep, "error: upload an image first", session_dir
        cancel = self.running[request.session_hash] = threading.Event()  # per run: a stopped run keeps its own flag
        say = PageProgress(bar, cancel)
        out_dir = Path(session_dir or self.new_session_dir())
        result, stopped = None, False
        try:
            if self.lock.locked():
                bar(0.0, desc="waiting for the previous run to stop")
            with self.lock:
                t0 = time.perf_counter()
                dev = self.pipe.device
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                result = self.pipe.run(image, resolution=int(resolution), seed=int(seed), steps=int(steps),
                                       fov_deg=float(fov), progress=say, preprocess=False)  # the upload was preprocessed
                out_dir.mkdir(parents=True, exist_ok=True)
                for old in out_dir.glob("*.glb"):  # a session keeps its latest asset only
                    old.unlink(missing_ok=True)
                out = out_dir / f"pixal3d_seed{int(seed)}_{uuid.uuid4().hex[:6]}.glb"
                stats = result.save_glb(out, texture_size=int(texture_size) or None, decimation_target=int(faces) or None,
                                        export=export or None, texture_format=texture_format or None, progress=say)
                seconds = time.perf_counter() - t0
                rows = [[n, f"{s:.2f}", d] for n, s, d in result.timings + stats["timings"]]
                rows.append(["total", f"{seconds:.2f}", ""])
                rows.append(["tokens", "", ", ".join(f"{k} {v:,}" for k, v in result.tokens.items())])
                tex = f"texture {stats['texture_size']}²" if stats.get("texture_size") else "no texture (512: shape only)"
                rows.append(["mesh", "", f"{stats['faces']:,} faces, {stats['vertices']:,} vertices, {tex}"])
                rows.append(["peak memory", "", _peak_memory(dev)])
                status = (f"done in {seconds:.1f} s: {stats['faces']:,} faces, {tex}, {stats['bytes'] / 1e6:.1f} MB GLB"
                          + ("  (tiny preset: random weights, a structural demo)" if self.preset else ""))
                return str(out), str(out), rows, status, str(out_dir)
        except Cancelled:  # Gradio has already stopped waiting; the Stop button wrote the status line
            stopped = True
            return *keep, "stopped", session_dir
        except Pixal3DError as e:
            return *keep, _error_line(e), session_dir
        except Exception as e:  # never a traceback in the page; the server log has it
            traceback.print_exc()
            return *keep, _error_line(e) + f" ({type(e).__name__})", session_dir
        finally:
            if self.running.get(request.session_hash) is cancel:
                del self.running[request.session_hash]
            del result
            for flow in self.pipe.flows.values():  # a stage cut short leaves its backend caches behind
                self.pipe._release(flow)
            gc.collect()
            if self.pipe.device.type == "cuda":
                torch.cuda.empty_cache()
            if stopped:
                print(f"[pixal3d-rt] a run of session {request.session_hash[:8]} stopped; its memory is freed",
                      file=sys.stderr, flush=True)

    def page(self, session_ttl: int):
        import gradio as gr

        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no Google Fonts fetch
                                  font_mono=["ui-monospace", "monospace"])
        with gr.Blocks(title="pixal3d-rt", theme=theme, analytics_enabled=False, head=WEBGL_FALLBACK,
                       delete_cache=(min(600, session_ttl), session_ttl)) as demo:
            gr.Markdown("## pixal3d-rt: one image → a textured PBR 3D asset (GLB)")
            if self.preset:
                gr.Markdown(f"Preset `{self.preset}`: every network is small with seeded random weights; the asset "
                            "is a structural demo, not a reconstruction of the image.")
            image = gr.State(None)  # the preprocessed crop, kept on the server
            # the session's output folder; Gradio calls the callback when the session expires
            session_dir = gr.State(None, time_to_live=session_ttl,
                                   delete_callback=lambda d: d and shutil.rmtree(d, ignore_errors=True))
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="Image: RGBA with the background removed (RGB needs pixal3d-rt[rembg])",
                                     file_types=["image"], type="filepath", elem_id="upload")
                    crop = gr.Image(label="Crop", type="pil", interactive=False, height=256, elem_id="crop")
                    with gr.Row():
                        resolution = gr.Radio(["512", "1024", "1536"], value="1024", label="Resolution",
                                              info="512: shape only, no texture", elem_id="resolution")
                        seed = gr.Number(42, label="Seed", precision=0, minimum=0, maximum=2**32 - 1, elem_id="seed")
                    with gr.Row():
                        steps = gr.Slider(1, 50, value=12, step=1, label="Steps per stage", elem_id="steps")
                        fov = gr.Slider(1, 120, value=49.13, step=0.01, label="Field of view (°)",
                                        info="the photo's horizontal FOV", elem_id="fov")
                    with gr.Row():
                        texture = gr.Dropdown([("default", 0)] + [(f"{s}²", s) for s in TEXTURE_SIZES], value=0,
                                              label="Texture size", elem_id="texture")
                        faces = gr.Number(0, label="Faces (0: the default)", precision=0, minimum=0,
                                          maximum=10_000_000, elem_id="faces")
                    with gr.Row():
                        export = gr.Radio(list(EXPORT_MODES), value=DEFAULT_MODE, label="Export",
                                          info="upstream: remeshed, closed, 1M faces, 4096² webp", elem_id="export-mode")
                        texture_format = gr.Radio([("mode's", ""), ("png", "png"), ("webp", "webp")], value="",
                                                  label="Texture format", elem_id="texture-format")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Stop", elem_id="stop")
                    status = gr.Markdown("", elem_id="status")
                with gr.Column():
                    viewer = gr.Model3D(label="Asset", clear_color=(0.85, 0.86, 0.88, 1.0), height=420, elem_id="viewer")
                    glb = gr.File(label="GLB", interactive=False, elem_id="glb")
                    summary = gr.Dataframe(headers=["stage", "seconds", "detail"], label="Summary", interactive=False,
                                           column_widths=["25%", "13%", "62%"], wrap=True, max_height=1000,
                                           elem_id="summary")

            upload.change(self.upload, [upload, session_dir], [crop, image, status, session_dir], concurrency_limit=2)

            def generate(image, resolution, seed, steps, fov, texture, faces, export, texture_format, session_dir,
                         request: gr.Request, progress=gr.Progress()):
                return self.generate(image, resolution, seed, steps, fov, texture, faces, session_dir, request, progress,
                                     export, texture_format)

            def stop_run(request: gr.Request):
                return self.stop(request)

            event = run.click(generate, [image, resolution, seed, steps, fov, texture, faces, export, texture_format, session_dir],
                              [viewer, glb, summary, status, session_dir], concurrency_limit=1, concurrency_id="generate",
                              show_progress_on=[viewer])
            stop.click(stop_run, None, status, cancels=[event], queue=False)
        return demo


@click.command("serve")
@click.option("--weights", metavar="DIR|HUB_ID", default=None,
              help="Official weights: a directory in the official layout, or a Hugging Face id (TencentARC/Pixal3D).")
@click.option("--preset", type=click.Choice(["tiny"]), help="Build every network small with seeded random weights (structural demo).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 opens the page to the network (no login).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--backend", type=click.Choice(["eager", "cuda"]), default=None, help="Flow networks: eager reference, or the cuda backend (default on a GPU).")
@click.option("--max-upload-mb", type=click.IntRange(1, 4096), default=20, show_default=True, help="Largest upload accepted.")
@click.option("--max-image-pixels", type=click.IntRange(1, 1 << 40), default=None,
              help="Refuse larger images before decoding (default 64,000,000).")
@click.option("--session-ttl", type=click.IntRange(1, 7 * 24 * 3600), default=3600, show_default=True,
              help="Seconds after its last use that a session's output folder is removed.")
def serve(weights, preset, host, port, device, backend, max_upload_mb, max_image_pixels, session_ttl):
    """Serve a web page to make assets: upload, settings, live progress, 3D preview, GLB download."""
    from .cli import _check_source, _fail, _load_pipeline
    from .preprocess import MAX_PIXELS
    from .progress import ConsoleProgress

    _check_source(weights, preset)
    try:  # before the networks load: a taken port fails in a second, not after the load
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as e:
        _fail(f"cannot serve on {host}:{port}: " + ("the port is in use (pick another with --port N)"
                                                    if e.errno == errno.EADDRINUSE else e.strerror or str(e)))
    root = Path(tempfile.mkdtemp(prefix="pixal3d-serve-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "gradio"))  # uploads and Gradio's output copies
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        _fail(f"the web page needs Gradio: {WEB_INSTALL}")
    say = ConsoleProgress()
    try:
        pipe = _load_pipeline(weights, preset, device, 1024, backend, None, say)  # every network: all resolutions
    except Pixal3DError as e:
        _fail(str(e))
    server = Server(pipe, root, max_image_pixels or MAX_PIXELS, preset)
    demo = server.page(session_ttl)
    demo.queue(max_size=32)
    click.echo(f"[pixal3d-rt] outputs under {root} (a session's folder goes {session_ttl} s after its last use)", err=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"[pixal3d-rt] listening on {host}: anyone who reaches this address can use the page", err=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped service closes like Ctrl-C, removing its outputs
    try:
        demo.launch(server_name=host, server_port=port, max_file_size=f"{max_upload_mb}mb", show_error=False,
                    share=False, inbrowser=False, ssr_mode=False, show_api=False, quiet=True, prevent_thread_lock=True)
        click.echo(f"[pixal3d-rt] serving on {demo.local_url} (Ctrl-C stops)", err=True)
        demo.block_thread()
    except OSError as e:
        why = "the port is in use (pick another with --port N)" if "empty port" in str(e) else str(e).splitlines()[0]
        _fail(f"cannot serve on {host}:{port}: {why}")
    finally:
        for ev in list(server.running.values()):  # a run in flight stops at its next step, before the exit
            ev.set()
        if server.lock.acquire(timeout=60):
            server.lock.release()
        shutil.rmtree(root, ignore_errors=True)
