"""`pixal3d-rt serve` in a real browser: the server runs as a subprocess on the tiny preset, and headless
Debian Chromium, driven by Playwright, uses the page as a person would (upload, settings, Generate,
progress, viewer, download, Stop, a corrupt upload). PIXAL3D_SERVE_SCREENSHOT=path also writes the
page with its result there (README's picture)."""
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from test_glb import _run_validator

ROOT = Path(__file__).resolve().parents[1]
MUG = ROOT / "examples" / "mug.png"
CHROMIUM = os.environ.get("PIXAL3D_CHROMIUM", "/usr/bin/chromium")
# headless without a GPU; no background networking (this machine's network is closed)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TTL = 30  # --session-ttl: short, so the test sees a session's folder go (long enough for a loaded machine)
RUN_S = 600  # longest wait for a run: ~10 s on an idle 2-core machine, minutes when other jobs share it
MAX_PIXELS = 300_000  # --max-image-pixels: the mug (320×320) and heavy.png (540×540) pass, 600×600 does not


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(path) -> str:
    return Path(path).read_text(errors="replace")


@contextmanager
def _server(tmp_path, *args, env=None):
    """`pixal3d-rt serve` in its own process, its temporary files under tmp_path; yields (url, proc, log)."""
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("GRADIO_TEMP_DIR", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from pixal3d_rt.cli import main; main()", "serve", "--preset", "tiny",
                                 "--port", str(port), "--session-ttl", str(TTL), "--max-upload-mb", "1",
                                 "--max-image-pixels", str(MAX_PIXELS), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{_log(log)[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"no page at {url} after 300 s:\n{_log(log)[-3000:]}"
            time.sleep(0.5)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _browser(pw):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian: apt-get install chromium; .ci/run installs it)")
    return pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def _status(page) -> str:
    return page.inner_text("#status").strip()


def _wait_status(page, pattern, timeout=120):
    page.wait_for_function("(re) => new RegExp(re).test(document.querySelector('#status').innerText)",
                           arg=pattern, timeout=timeout * 1000)
    return _status(page)


def _upload(page, path, expect_crop=True):
    if not page.locator("#upload input[type=file]").count():  # the last upload is shown: remove it first, as a person would
        page.click("#upload button[aria-label='Clear']")
        page.wait_for_function("() => !document.querySelector('#crop img')", timeout=10_000)
    page.set_input_files("#upload input[type=file]", str(path))
    if expect_crop is None:
        return None
    if expect_crop:
        page.wait_for_selector("#crop img", timeout=120_000)
        return _wait_status(page, re.escape(Path(path).name) + ": ", 60)
    return _wait_status(page, "^error: ", 60)


def _set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _record_progress(page):
    """Keep every text the viewer's progress overlay shows (queue position, stage, step i/n), however
    briefly it shows."""
    page.evaluate("""() => {
        window.__seen = new Set();
        const viewer = document.querySelector('#viewer');
        new MutationObserver(() => window.__seen.add(viewer.innerText))
            .observe(viewer, {subtree: true, childList: true, characterData: true});
    }""")


def _seen(page) -> str:
    return "\n".join(page.evaluate("() => [...window.__seen]"))


def _drawn_pixels(png: bytes) -> int:
    """Pixels of the viewer's canvas that differ from its background (the corner's colour)."""
    img = Image.open(BytesIO(png)).convert("RGB")
    bg = img.getpixel((2, 2))
    return sum(1 for p in img.getdata() if max(abs(a - b) for a, b in zip(p, bg)) > 24)


def _glb_json(path) -> dict:
    data = Path(path).read_bytes()
    assert data[:4] == b"glTF", "not a GLB"
    (jlen,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[20:20 + jlen])


def test_page_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    t_start = time.time()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not an image" * 10)
    wide = tmp_path / "wide.png"  # 2 kB, over the pixel limit
    Image.new("RGBA", (600, 600), (200, 80, 40, 255)).save(wide)
    heavy = tmp_path / "heavy.png"  # within the pixel limit, over the upload limit of 1 MB
    Image.frombytes("RGBA", (540, 540), os.urandom(540 * 540 * 4)).save(heavy)
    assert heavy.stat().st_size > 1 << 20
    with _server(tmp_path) as (url, proc, log), sync_playwright() as pw:
        text = _log(log)
        assert re.search(r"serving on http://127\.0\.0\.1:\d+/", text), text  # localhost by default
        root = Path(re.search(r"outputs under (\S+)", text).group(1))
        browser = _browser(pw)
        a = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        b = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        glb_loads = []
        a.on("response", lambda r: glb_loads.append((r.url, r.status)) if r.url.endswith(".glb") else None)
        for page in (a, b):
            page.set_default_timeout(120_000)  # clicks and waits on a machine that other jobs may be loading
            page.goto(url)
            page.wait_for_selector("#upload input[type=file]", state="attached")
            assert "mug.png: 320×320 RGBA" in _upload(page, MUG)

        # A: a quick textured run; B: a long one, queued behind it
        _set_number(a, "steps", 2)
        a.click("#texture input")
        a.get_by_role("option", name="128²").click()
        a.locator("#texture-format").get_by_text("webp", exact=True).click()  # export settings reach save_glb
        assert a.locator("#export-mode").get_by_text("upstream", exact=True).is_visible()
        _set_number(b, "steps", 50)
        for page in (a, b):
            _record_progress(page)
        a.click("#generate")
        a.wait_for_function("() => [...window.__seen].some(t => /processing|ss_flow/.test(t))", timeout=RUN_S * 1000)  # A first
        b.click("#generate")
        done = _wait_status(a, "^(done|error)", RUN_S)
        assert done.startswith("done") and "texture 128²" in done, done
        seen = _seen(a)  # stages and their step counters, live (Gradio throttles: some updates are skipped)
        assert re.search(r"^(dinov3|ss_flow|shape_lr_flow|shape_hr_flow|tex_flow|shape_decoder|glb_export) ", seen, re.M), seen
        assert re.search(r"_flow: step \d/2", seen), seen
        assert re.search(r"queue: 1/1 \| [1-9]\d*\.\ds", _seen(b)), _seen(b)  # B waited seconds, and saw where

        # the viewer fetched the GLB and drew it
        deadline = time.time() + 120
        while not any(s == 200 for _, s in glb_loads):
            assert time.time() < deadline, f"the viewer did not load the GLB: {glb_loads}"
            a.wait_for_timeout(200)
        canvas = a.locator("#viewer canvas")
        canvas.wait_for(timeout=120_000)
        deadline, drawn = time.time() + 120, 0
        while time.time() < deadline and drawn < 50:
            a.wait_for_timeout(500)
            drawn = _drawn_pixels(canvas.screenshot())
        assert drawn >= 50, f"the viewer's canvas shows only its background ({drawn} pixels differ)"
        summary = a.inner_text("#summary")
        for word in ("tex_flow", "glb_export", "tokens", "peak memory"):
            assert word in summary, summary
        shot = tmp_path / "serve.png"
        a.screenshot(path=str(shot), full_page=True)
        if os.environ.get("PIXAL3D_SERVE_SCREENSHOT"):  # 256 colours: small enough to commit
            Image.open(shot).convert("RGB").quantize(256).save(os.environ["PIXAL3D_SERVE_SCREENSHOT"], optimize=True)

        # the download button gives the GLB the viewer shows: valid, with its PBR textures
        with a.expect_download() as dl:
            a.locator("#glb a[download]").first.click()
        glb = tmp_path / dl.value.suggested_filename
        dl.value.save_as(glb)
        rc, report = _run_validator(glb)
        assert report["numErrors"] == 0 and rc == 0, report["errors"]
        doc = _glb_json(glb)
        pbr = doc["materials"][0]["pbrMetallicRoughness"]
        assert "baseColorTexture" in pbr and "metallicRoughnessTexture" in pbr, doc["materials"]
        assert {(im["width"], im["height"]) for im in _images(glb, doc)} == {(128, 128)}
        assert {im["mimeType"] for im in doc["images"]} == {"image/webp"} and "EXT_texture_webp" in doc["extensionsUsed"]
        assert glb.name == Path(glb_loads[-1][0]).name  # the file the viewer loaded

        # B runs now; Stop ends its run at the next step (the server says so) and the page says stopped
        b.wait_for_function("() => /step \\d+\\/50/.test(document.querySelector('#viewer').innerText)", timeout=RUN_S * 1000)
        b.click("#stop")
        assert _wait_status(b, "^stopped", 60) == "stopped"
        deadline = time.time() + 60
        while "stopped; its memory is freed" not in _log(log):
            assert time.time() < deadline, "the stopped run did not stop:\n" + _log(log)[-2000:]
            time.sleep(0.2)

        # A: a corrupt upload gives the one-line error, no traceback, no server path; the next upload works
        err = _upload(a, corrupt, expect_crop=False)
        assert re.fullmatch(r"error: corrupt\.png: not a readable image\b[^\n]*", err), err
        assert "Traceback" not in a.inner_text("body") and str(tmp_path) not in err and "gradio/" not in err
        assert a.locator("#crop img").count() == 0
        err = _upload(a, wide, expect_crop=False)
        assert err == f"error: wide.png: 600×600 pixels is more than the limit of {MAX_PIXELS:,} pixels " \
                      "(raise it with --max-image-pixels N if the file is trusted)", err
        _upload(a, heavy, expect_crop=None)  # Gradio refuses it before the page's handler sees it
        toast = a.locator(".toast-body", has_text="heavy.png")
        toast.wait_for(timeout=60_000)
        assert "File size exceeds the maximum allowed size of 1048576 bytes" in toast.inner_text()
        assert a.locator("#crop img").count() == 0
        a.click("#generate")
        assert _wait_status(a, "^error: upload") == "error: upload an image first"
        _upload(a, MUG)
        a.click("#resolution label:has-text('512')")
        a.click("#generate")
        done = _wait_status(a, "^(done|error)", RUN_S)
        assert done.startswith("done") and "no texture" in done, done
        # A's session folder holds its latest GLB only (and goes TTL s after this last use, below)
        sessions = [d for d in (root / "sessions").iterdir()]
        assert len(sessions) == 1 and len(list(sessions[0].glob("*.glb"))) == 1, sessions
        deadline = time.time() + 120
        while len({u for u, s in glb_loads if s == 200}) < 2:
            assert time.time() < deadline, f"the viewer did not load the new GLB: {glb_loads}"
            a.wait_for_timeout(200)

        deadline = time.time() + TTL + 15
        while sessions[0].exists():
            assert time.time() < deadline, f"{sessions[0]} still there {TTL + 15} s after its last use"
            time.sleep(0.5)
        browser.close()

        proc.send_signal(signal.SIGTERM)  # a stopped server removes its outputs
        assert proc.wait(90) == 0, _log(log)[-2000:]
        assert not root.exists(), list(root.rglob("*"))
        assert "Traceback" not in _log(log), _log(log)[-3000:]
    print(f"browser test: {time.time() - t_start:.1f} s")


def _images(path, doc):
    data = Path(path).read_bytes()
    (jlen,) = struct.unpack_from("<I", data, 12)
    bin_start = 20 + jlen + 8
    out = []
    for im in doc.get("images", []):
        view = doc["bufferViews"][im["bufferView"]]
        off = bin_start + view.get("byteOffset", 0)
        out.append(Image.open(BytesIO(data[off:off + view["byteLength"]])).size)
    return [{"width": w, "height": h} for w, h in out]


def test_serve_without_gradio_says_how_to_install(tmp_path):
    code = "import sys; sys.modules['gradio'] = None; from pixal3d_rt.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "serve", "--preset", "tiny", "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 2, r
    assert r.stderr.strip() == "error: the web page needs Gradio: " + \
        "pip install 'pixal3d-rt[web]' (in a checkout: pip install -e '.[web]')", r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_serve_on_a_taken_port_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", "from pixal3d_rt.cli import main; main()", "serve", "--preset", "tiny",
                            "--port", str(port)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 2, r
    assert r.stderr.strip() == f"error: cannot serve on 127.0.0.1:{port}: the port is in use (pick another with --port N)", r.stderr
