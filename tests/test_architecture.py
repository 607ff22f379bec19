"""The layering rules, checked on the real import graph (AST, imports inside functions included).

- engine/ never imports streamlit (the engine runs without the app);
- no import cycles among the project's modules;
- a family's ``model.py`` imports nothing from training (``*.train``, ``engine.core.training``),
  pages or app: a model can be built and loaded without the trainer or the UI;
- pages, app/ and the engine's family-neutral modules never import a family's ``model``
  module: they go through the family's own ``family.py`` / ``analysis.py`` / ``records.py``;
- every folder under engine/families/ with a ``family.py`` defines ``FAMILY`` named as the folder.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("engine", "app", "pages", "streamlit_app.py")
MODEL = re.compile(r"^engine\.families\.[a-z0-9_]+\.model$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for src in SOURCES:
        p = ROOT / src
        for f in [p] if p.is_file() else sorted(p.rglob("*.py")):
            files[module_name(f)] = f
    return files


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an ``import`` or ``from ... import`` anywhere in the tree may refer
    to: for ``from pkg import x`` both ``pkg`` and ``pkg.x`` (x may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return names


def resolve(name: str, modules) -> str | None:
    """The longest prefix of ``name`` that is a project module (None: not the project's)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def build_graph(sources: dict[str, str], packages: set[str]) -> tuple[dict, dict]:
    """(module -> project modules it imports, module -> external top-level packages it imports)."""
    graph, external = {}, {}
    for m, text in sources.items():
        names = imported_names(ast.parse(text), m, m in packages)
        graph[m] = {r for n in names if (r := resolve(n, sources)) and r != m}
        external[m] = {n.split(".")[0] for n in names if resolve(n, sources) is None}
    return graph, external


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's strongly connected components with more than one module (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


@pytest.fixture(scope="module")
def project():
    files = project_files()
    sources = {m: f.read_text() for m, f in files.items()}
    packages = {m for m, f in files.items() if f.name == "__init__.py"}
    return build_graph(sources, packages)


# --- the checker itself -----------------------------------------------------------------------


def test_checker_sees_nested_relative_and_submodule_imports():
    sources = {
        "pkg": "",
        "pkg.a": "def f():\n    from pkg.sub import mod\n",
        "pkg.sub": "",
        "pkg.sub.mod": "from . import other\nimport streamlit as st\n",
        "pkg.sub.other": "from ..a import f\n",
    }
    graph, external = build_graph(sources, {"pkg", "pkg.sub"})
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.mod"}  # inside a function; a submodule
    assert graph["pkg.sub.mod"] == {"pkg.sub", "pkg.sub.other"}  # relative
    assert graph["pkg.sub.other"] == {"pkg.a"}  # two levels up
    assert external["pkg.sub.mod"] == {"streamlit"}
    assert strongly_connected(graph) == [frozenset({"pkg.a", "pkg.sub.mod", "pkg.sub.other"})]


def test_graph_covers_the_project(project):
    graph, _ = project
    assert {"streamlit_app", "engine.core.policies", "pages.language", "app.tour.live"} <= set(
        graph
    )
    # an import inside a function, and ``from pkg import module``, are both edges
    assert "engine.families.early_exit_lm.analysis" in graph["pages.language"]
    assert "engine.run.runtime" in graph["app.tour.live"]


# --- the rules --------------------------------------------------------------------------------


def test_engine_never_imports_streamlit(project):
    _, external = project
    bad = sorted(m for m, ext in external.items() if m.startswith("engine") and "streamlit" in ext)
    assert not bad, f"engine modules importing streamlit: {bad}"


def test_no_import_cycles(project):
    graph, _ = project
    cycles = [sorted(c) for c in strongly_connected(graph)]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_family_models_import_no_training_app_or_pages(project):
    graph, _ = project
    models = [m for m in graph if MODEL.match(m)]
    assert len(models) >= 5
    bad = [
        (m, d)
        for m in models
        for d in graph[m]
        if d.endswith(".train")
        or d == "engine.core.training"
        or d.startswith(("engine.core.training.", "app", "pages"))
    ]
    assert not bad, f"model modules importing upward: {bad}"


@pytest.mark.parametrize(
    "prefix",
    [
        "pages",
        "app",
        "streamlit_app",
        "engine.compare_sources",
        "engine.trace_store",
        "engine.registry",
    ],
)
def test_app_pages_and_neutral_engine_never_import_a_family_model(project, prefix):
    graph, _ = project
    bad = [
        (m, d)
        for m, deps in graph.items()
        if m == prefix or m.startswith(prefix + ".")
        for d in deps
        if MODEL.match(d)
    ]
    assert not bad, f"imports of a family's model module (use its family/analysis module): {bad}"


def test_every_family_folder_defines_its_family():
    from engine.core.family import Family

    folders = sorted(
        p.name for p in (ROOT / "engine" / "families").iterdir() if (p / "family.py").is_file()
    )
    assert len(folders) >= 5
    for name in folders:
        module = importlib.import_module(f"engine.families.{name}.family")
        family = getattr(module, "FAMILY", None)
        assert isinstance(family, Family), f"engine/families/{name}/family.py has no FAMILY"
        assert family.name == name, f"engine/families/{name}: FAMILY.name is {family.name!r}"


def test_streamlit_caches_live_in_app_only():
    """One model sits in one cache: pages and the engine define no st.cache_* of their own."""
    root = Path(__file__).resolve().parent.parent
    bad = [
        f"{p.relative_to(root)}:{n}"
        for folder in ("pages", "engine")
        for p in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "st.cache_data" in line or "st.cache_resource" in line
    ]
    assert not bad, f"Streamlit caches outside app/: {bad}"
