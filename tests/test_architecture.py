"""The package layering: every package imports only itself and the layers below it (README, "Layout").

Parsed, not imported: every `import` / `from ... import` statement of every project file, including the
ones inside functions and under `if TYPE_CHECKING:`, is checked against LAYERS. Packages of one layer are
peers: they do not import each other. The entry points (train.py, bench/, tests/) sit above all of them.
Inside tests/, no test module imports another: shared helpers live in conftest.py and helper modules. Tests
mirror the packages: the tests of `<package>/<module>.py` are in tests/<package>/ (this file, about every
package at once, is the only test at the top of tests/).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom first; a package may import packages of strictly lower layers (and itself)
LAYERS: list[tuple[str, ...]] = [
    ("conf",),                          # typed config schemas and errors: imports nothing of ours
    ("runtime",),                       # device, launcher ranks, run-directory lock, atomic writes
    ("decoding",),                      # draft trees, verification rules, static KV cache, the decoder
    ("drafters",),                      # the target wrapper, losses, drafter families, checkpoint folders
    ("data_gen",),                      # prompts, templating, regeneration, caches
    ("plan",),                          # memory / disk / time estimates from config.json (train's preflight reads it)
    ("training", "eval", "export"),     # the stages that train, measure and ship a drafter
]
ENTRY = ("train", "bench", "tests")  # above every layer: may import anything, imported by none
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
PROJECT = set(LAYER_OF) | set(ENTRY)


def imported_modules(tree: ast.AST):
    """(line, dotted module) of every absolute import in a parsed file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def violations(path: Path) -> list[str]:
    rel = path.relative_to(ROOT)
    own = rel.parts[0]
    if own not in LAYER_OF:
        return []
    out = []
    for line, module in imported_modules(ast.parse(path.read_text(), str(rel))):
        top = module.split(".")[0]
        if top not in PROJECT or top == own:
            continue
        if top in ENTRY or LAYER_OF[top] >= LAYER_OF[own]:
            why = f"{top} and {own} are peers" if LAYER_OF.get(top) == LAYER_OF[own] else f"{top} is above {own}"
            out.append(f"{rel}:{line}: imports {module} ({why})")
    return out


def project_files() -> list[Path]:
    return sorted(p for pkg in LAYER_OF for p in (ROOT / pkg).rglob("*.py"))


def test_every_package_of_the_repository_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - set(LAYER_OF) - set(ENTRY) == set()


def test_imports_point_down_the_layers():
    files = project_files()
    assert len(files) > 50  # the walk found the project
    found = [v for f in files for v in violations(f)]
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_an_upward_import_is_named_with_file_and_line(tmp_path, monkeypatch):
    """The check itself: an upward import, even inside a function, is reported with file, line and module."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for pkg in ("decoding", "eval"):
        (tmp_path / pkg).mkdir()
    up = tmp_path / "decoding" / "x.py"
    up.write_text("import torch\nfrom conf.errors import DraftsmithError\nfrom decoding import tree\n\n\n"
                  "def f():\n    from eval.stage import run\n    import tests.conftest\n")
    assert violations(up) == ["decoding/x.py:7: imports eval.stage (eval is above decoding)",
                              "decoding/x.py:8: imports tests.conftest (tests is above decoding)"]
    peer = tmp_path / "eval" / "y.py"
    peer.write_text("from training.stage import train\n")
    assert violations(peer) == ["eval/y.py:1: imports training.stage (training and eval are peers)"]



def imported_test_modules(path: Path) -> list[str]:
    """The test modules (tests/<package>/test_*.py) that `path` imports: tests share helpers through conftest.py and
    helper modules (tests/*_util.py, tests/train_fixtures.py), never by importing another test module, so
    each test file can be read, run and moved on its own."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import test_x` / `from .test_x import y` inside tests/
                base = ".".join(["tests", *filter(None, [base])])
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found += [f"{path.name}:{node.lineno}: imports {n}" for n in names
                  if n.startswith("tests.") and n.rsplit(".", 1)[-1].startswith("test_")]
    return found


def test_no_test_module_imports_another_test_module():
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 40
    found = [v for f in files for v in imported_test_modules(f)]
    assert not found, "test modules importing test modules (move the helper to conftest.py or a helper module):\n" \
                      + "\n".join(found)


def test_a_test_module_import_is_named(tmp_path):
    """The check itself: absolute, `from tests import` and relative imports of a test module are reported."""
    f = tmp_path / "test_x.py"
    f.write_text("import tests.conftest\nfrom tests.train_fixtures import ROOT\nfrom tests.test_medusa import grads\n"
                 "from tests import test_decoder, eagle_util\nfrom .test_data_stage import CONVS\n"
                 "import tests.test_gto\nfrom tests.decoding.test_tree import PathDrafter\n")
    assert imported_test_modules(f) == ["test_x.py:3: imports tests.test_medusa",
                                      "test_x.py:4: imports tests.test_decoder",
                                      "test_x.py:5: imports tests.test_data_stage",
                                      "test_x.py:6: imports tests.test_gto",
                                      "test_x.py:7: imports tests.decoding.test_tree"]


def test_tests_mirror_the_packages():
    """A newcomer finds a module's tests at once: every test file sits in tests/<package>/ for one of the
    project's packages (or bench/), and nowhere else."""
    homes = set(LAYER_OF) | {"bench"}
    misplaced = [str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                 if f.parent.name not in homes and f != Path(__file__).resolve()]
    assert not misplaced, f"test files outside tests/<package>/ (packages: {', '.join(sorted(homes))}):\n" \
                          + "\n".join(misplaced)
    assert {f.parent.name for f in (ROOT / "tests").rglob("test_*.py")} - {"tests"} == homes


def private_imports(path: Path) -> list[str]:
    """Names with a leading underscore that `path` imports from another top-level package of ours: a private
    name is its module's to change, so a bench script or a stage that borrows one breaks silently when it
    does (bench/bench_decode.py once imported eval.report's `_f`). Tests may reach into their own subject."""
    rel = path.relative_to(ROOT)
    own = rel.parts[0].removesuffix(".py")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(rel))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in PROJECT and top != own:
                found += [f"{rel}:{node.lineno}: imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_a_private_name_of_another_package():
    files = project_files() + sorted((ROOT / "bench").rglob("*.py")) + [ROOT / "train.py"]
    found = [v for f in files for v in private_imports(f)]
    assert not found, "private names imported across packages (make them public):\n" + "\n".join(found)


def test_a_private_import_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "bench").mkdir()
    f = tmp_path / "bench" / "b.py"
    f.write_text("from eval.report import cell, _f\nfrom bench.peers import _x\nfrom decoding.tree import __all__\n")
    assert private_imports(f) == ["bench/b.py:1: imports eval.report._f"]


def module_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, function bodies included), dotted names;
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg itself."""
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in LAYER_OF if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names]
            else:
                continue
            deps.update(n for n in names if n in files and n != mod)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted: modules that import
    each other, directly or around a loop."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other():
    """Inside a package too, imports point one way: a circle (even through an import deferred into a function)
    means neither module can be read, tested or moved without the other."""
    assert import_circles(module_graph(ROOT)) == []


def test_an_import_circle_is_named(tmp_path):
    (tmp_path / "decoding").mkdir()
    (tmp_path / "decoding" / "a.py").write_text("from decoding.b import x\n")
    (tmp_path / "decoding" / "b.py").write_text("def f():\n    from decoding import c\n")
    (tmp_path / "decoding" / "c.py").write_text("import decoding.a\n")
    (tmp_path / "decoding" / "d.py").write_text("from decoding.a import y\n")  # imports into the circle: not in it
    assert import_circles(module_graph(tmp_path)) == [["decoding.a", "decoding.b", "decoding.c"]]
