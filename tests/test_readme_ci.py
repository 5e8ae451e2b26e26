"""README's first two commands and .ci/run stay one: CI installs what command 1 installs and ends with
command 2, and the `test` extra that command 1 installs holds every package the tests import."""
import ast
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALIASES = {"PIL": "pillow"}  # import name -> distribution, where they differ beyond - / _ / case


def _commands(text):
    return [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]


def _readme_commands():
    """The commands of README's first ```bash block: command 1 first, the test command last."""
    m = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert m, "README.md has no ```bash block"
    cmds = _commands(m.group(1))
    assert len(cmds) >= 2, cmds
    return cmds


def _ci_commands():
    return _commands((ROOT / ".ci" / "run").read_text())


def _pip_installs(line):
    """What each `pip install` of a shell line installs: options dropped, `-e` kept, extras sorted."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words, part, parts = list(lex), [], []
    for w in words + [";"]:  # simple commands, split at && || ; | (quoted ones stay inside their word)
        if w and set(w) <= set("();<>|&"):
            parts.append(part)
            part = []
        else:
            part.append(w)
    reqs = []
    for words in parts:
        starts = [i for i in range(len(words) - 1) if words[i] == "pip" and words[i + 1] == "install"]
        if not starts:
            continue
        args, editable = words[starts[0] + 2:], False
        for w in args:
            if w in ("-e", "--editable"):
                editable = True
            elif not w.startswith("-"):
                w = re.sub(r"\[(.*)\]$", lambda m: "[" + ",".join(sorted(m.group(1).split(","))) + "]", w)
                reqs.append(("-e " if editable else "") + w)
                editable = False
    return reqs


def test_ci_installs_what_readme_command_1_installs():
    readme = _pip_installs(_readme_commands()[0])
    assert any(r.startswith("-e .[") for r in readme), f"README command 1 does not install the project: {readme}"
    ci = [r for line in _ci_commands() for r in _pip_installs(line) if r != "pip"]  # pip's own upgrade aside
    assert sorted(ci) == sorted(readme), f".ci/run installs {ci}, README command 1 {readme}"


def test_ci_ends_with_readme_test_command():
    assert _ci_commands()[-1] == _readme_commands()[-1]


def _strings(node, lists):
    """A requirement list of setup.py: literals, `*NAME`, `NAME` and `+` of its module-level lists."""
    if isinstance(node, ast.Name):
        return lists[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _strings(node.left, lists) + _strings(node.right, lists)
    return [s for e in node.elts for s in (_strings(e.value, lists) if isinstance(e, ast.Starred) else [ast.literal_eval(e)])]


def _setup_requirements():
    tree = ast.parse((ROOT / "setup.py").read_text())
    lists = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and isinstance(node.value, (ast.List, ast.BinOp)):
            lists[node.targets[0].id] = _strings(node.value, lists)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    extras = kw["extras_require"]
    return _strings(kw["install_requires"], lists), {ast.literal_eval(k): _strings(v, lists) for k, v in zip(extras.keys, extras.values)}


def _catches_import_error(handler):
    t = handler.type
    return any(isinstance(x, ast.Name) and x.id in ("ImportError", "ModuleNotFoundError")
               for x in (t.elts if isinstance(t, ast.Tuple) else [t]))


def _imported(source):
    """Top-level names of the modules a file imports or importorskips, anywhere in it, except inside
    a `try` that catches ImportError (optional by design, e.g. rembg)."""
    tree = ast.parse(source)
    optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and any(map(_catches_import_error, t.handlers))
                for s in t.body for n in ast.walk(s)}
    mods = set()
    for n in ast.walk(tree):
        if id(n) in optional:
            continue
        if isinstance(n, ast.Import):
            mods |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0:
            mods.add(n.module.split(".")[0])
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "importorskip" and n.args \
                and isinstance(n.args[0], ast.Constant):
            mods.add(n.args[0].value.split(".")[0])
    return mods


def _dist(name):
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", name).group()).lower()


def test_test_extra_holds_what_the_tests_import():
    install, extras = _setup_requirements()
    test = extras["test"]
    # the tests run the kernels and the export path, so those extras come with `test`
    assert set(extras["kernels"]) <= set(test) and set(extras["export"]) <= set(test), test
    available = {_dist(r) for r in install + test}
    tests = sorted((ROOT / "tests").glob("*.py"))
    local = {p.stem for p in tests} | {"pixal3d_rt"}
    missing = {}
    for f in tests:
        for mod in sorted(_imported(f.read_text()) - set(sys.stdlib_module_names) - local):
            if _dist(ALIASES.get(mod, mod)) not in available:
                missing.setdefault(mod, []).append(f.name)
    assert not missing, f"imported by the tests but not installed by README command 1 (setup.py TEST): {missing}"
