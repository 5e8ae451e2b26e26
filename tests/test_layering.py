"""The dependency rule of DESIGN.md §2: `export` imports `runtime`, the runtime never imports `export`
(what both need, the export specs and manifest reading, lives in `runtime/`)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
FORBIDDEN = "pixal3d_rt.export"


def _package_of(path: Path) -> str:
    """Dotted package a runtime file's relative imports resolve against."""
    return ".".join(["pixal3d_rt", "runtime", *path.relative_to(RUNTIME).parent.parts])


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, at any depth (function-local ones
    too), relative ones resolved against `package`; `from X import y` yields X.y as well, since y
    may be a module; `importlib.import_module("...")` / `__import__("...")` with a literal count too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_export(name: str) -> bool:
    return name == FORBIDDEN or name.startswith(FORBIDDEN + ".")


def test_runtime_sources_never_import_export():
    files = sorted(RUNTIME.rglob("*.py"))
    assert files, f"no runtime sources under {RUNTIME}"
    bad = [f"{f.relative_to(RUNTIME.parent)}:{line}: {name}" for f in files
           for line, name in imported_modules(f.read_text(), _package_of(f)) if _is_export(name)]
    assert not bad, "runtime/ imports export/ (move what both need into runtime/):\n" + "\n".join(bad)


def test_import_check_catches_every_spelling():
    # the static check is only as good as its parser: each way of writing the import must be seen
    package = "pixal3d_rt.runtime.sub"  # a file one folder below runtime/
    forms = ["import pixal3d_rt.export.specs", "from pixal3d_rt.export.specs import ExportSpec",
             "from pixal3d_rt import export", "from ... import export", "from ...export import trt_build",
             "def load():\n    from pixal3d_rt.export import specs", "importlib.import_module('pixal3d_rt.export.fp8')"]
    for form in forms:
        names = [n for _, n in imported_modules(form, package)]
        assert any(_is_export(n) for n in names), (form, names)
    allowed = "from .specs import ExportSpec\nfrom .. import kernels\nimport pixal3d_rt.exporters\n"
    assert not any(_is_export(n) for _, n in imported_modules(allowed, package))


def test_importing_the_engine_runners_loads_no_export_module():
    # a fresh interpreter: this test session may already have imported export
    code = ("import sys, pixal3d_rt.runtime.tensorrt_engine, pixal3d_rt.runtime.aoti_engine\n"
            f"print(' '.join(sorted(m for m in sys.modules if m == {FORBIDDEN!r} or m.startswith({FORBIDDEN + '.'!r}))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing the engine runners loaded: {r.stdout.strip()}"
