"""The import structure: no loop, no arrow pointing up, no import hidden in a function.

Read from the source with :mod:`ast` (nothing is imported). Layers, bottom to top::

    pipeline             pure functions on arrays; never imports Django or the web side
    surveys.storage      paths (the DATA_DIR layout), atomic output folders, mirror
    surveys.models       database rows
    surveys.processing   row jobs, stages (adapters over pipeline), viewer cache, reid summary
    surveys.cohorts      import, uploads, researcher pages of cohorts and subjects
    surveys.studies      blinded rater studies: design, rater flow, report
    surveys.urls/admin   the top

An import inside a function is allowed only for a module that is heavy to load
(it pulls in one of :data:`HEAVY_LIBRARIES` when imported), or in the places Django
loads before its app registry is ready (:data:`LATE_BY_DESIGN`), and must say why in
a comment on the line or directly above its block. Every other import is at module
level, so the graph below is the real one and a loop cannot hide.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "surveys", "deidstudy")
HEAVY_LIBRARIES = frozenset({
    "torch", "torchvision", "ultralytics", "onnxruntime", "onnx", "pyrender", "OpenGL", "dlib",
    "face_recognition_models", "trimesh", "matplotlib", "reportlab", "scipy", "skimage",
    "SimpleITK", "cv2", "django_rq", "rq", "redis", "boto3", "storages", "sklearn",
    "statsmodels", "pandas",
})


# modules loaded before the app registry is ready: they import the app's modules late
LATE_BY_DESIGN = frozenset({"surveys.apps", "deidstudy.rq"})


@dataclass(frozen=True)
class Imp:
    source: str      # importing module
    target: str      # imported module (project module, or a top-level library name)
    line: int
    in_function: bool
    commented: bool


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            if "migrations" in rel.parts:
                continue
            name = ".".join(rel.parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        parts = module.split(".")
        if MODULES[module].name != "__init__.py":
            parts = parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _owner(name: str) -> str:
    """The project module ``name`` lives in, or its top-level library name."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports() -> list[Imp]:
    found = []
    for mod, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        in_fn = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        in_fn.add(id(sub))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            # a comment on the statement's lines, or on the line above its block of imports
            stmt = " ".join(lines[node.lineno - 1:node.end_lineno])
            above = node.lineno - 2
            while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
                above -= 1
            commented = "#" in stmt or (above >= 0 and lines[above].strip().startswith("#"))
            for target in _resolve(mod, node):
                found.append(Imp(mod, _owner(target), node.lineno, id(node) in in_fn, commented))
    return found


IMPORTS = _imports()


def _graph(*, include_function_level: bool = True) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.source and (include_function_level
                                                              or not i.in_function):
            g[i.source].add(i.target)
    return g


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _heavy_modules() -> set[str]:
    """Project modules whose module-level imports pull in a heavy library (transitively)."""
    top = _graph(include_function_level=False)
    direct = {i.source for i in IMPORTS if not i.in_function
              and i.target.split(".")[0] in HEAVY_LIBRARIES}
    heavy = set(direct)
    changed = True
    while changed:
        changed = False
        for m, targets in top.items():
            if m not in heavy and targets & heavy:
                heavy.add(m)
                changed = True
    return heavy


def test_the_reader_sees_the_project():
    assert len(MODULES) > 60 and "surveys.storage.paths" in MODULES
    assert any(i.source == "surveys.processing.jobs" and i.target == "surveys.models" for i in IMPORTS)
    # the cycle finder finds a planted loop
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_loop_even_through_function_level_imports():
    assert _cycles(_graph()) == []


def test_pipeline_never_imports_django_or_the_web_side():
    bad = [f"{i.source}:{i.line} imports {i.target}" for i in IMPORTS
           if i.source.startswith("pipeline") and i.target.split(".")[0]
           in ("django", "surveys", "deidstudy", "rq", "django_rq")]
    assert bad == []


@pytest.mark.parametrize("lower,upper", [
    # rows know nothing of the code that uses them
    ("surveys.models", ("surveys.cohorts", "surveys.processing", "surveys.studies",
                        "surveys.urls", "surveys.admin", "surveys.access")),
    # where files live and how they are written: below the rows and everything else
    ("surveys.storage", ("surveys.models", "surveys.processing", "surveys.cohorts",
                         "surveys.studies")),
    # background work never imports pages, forms or URL confs
    ("surveys.processing", ("surveys.cohorts", "surveys.studies", "surveys.urls",
                            "surveys.admin")),
])
def test_no_arrow_points_up(lower, upper):
    bad = [f"{i.source}:{i.line} imports {i.target}" for i in IMPORTS
           if (i.source == lower or i.source.startswith(lower + "."))
           and any(i.target == u or i.target.startswith(u + ".") for u in upper)]
    assert bad == []


def test_function_level_imports_only_for_heavy_modules_and_say_why():
    heavy = _heavy_modules()
    assert "pipeline.render" in heavy and "surveys.storage.paths" not in heavy
    bad = []
    for i in IMPORTS:
        if not i.in_function or i.target not in MODULES:
            continue  # libraries may be imported late (optional dependencies)
        if i.target not in heavy and i.source not in LATE_BY_DESIGN:
            bad.append(f"{i.source}:{i.line} imports the light module {i.target} in a function")
        elif not i.commented:
            bad.append(f"{i.source}:{i.line} imports {i.target} in a function without a comment")
    assert bad == []
