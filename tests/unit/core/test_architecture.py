"""The layering the architecture promises, read from the code's own imports (every ``import``, also the
deferred ones inside functions): the library never imports Dagster or the code location, and no two
modules of the project import each other, directly or round a longer loop."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[3]
PACKAGES = ("fewshot_core", "pipelines")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (a name imported from a package counts as its module
    when such a module exists)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (PROJECT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = {t for t in _imports(path) if t in files and t != name}
        # importing ``a.b.c`` also runs the package ``a.b``'s __init__, which is not a dependency loop
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def _without_package_inits(graph):
    """Edges into a package's ``__init__`` that only re-exports are not loops of logic: drop edges from a
    module to the packages that contain it."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_the_library_never_imports_dagster_or_the_code_location():
    offenders = []
    for path in (PROJECT / "fewshot_core").rglob("*.py"):
        bad = {t for t in _imports(path) if t.split(".")[0] in ("dagster", "dagster_webserver", "pipelines")}
        if bad:
            offenders.append(f"{path.relative_to(PROJECT)}: {sorted(bad)}")
    assert not offenders, offenders


def test_no_import_cycles():
    cycles = _cycles(_without_package_inits(_graph()))
    assert not cycles, cycles


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_code_location_never_imports_the_launcher():
    """``pipelines/deploy/`` starts the profile's services and imports the code location; the code location
    (assets, definitions) reads where its steps run from ``pipelines/placement/`` and never imports back."""
    offenders = []
    for path in (PROJECT / "pipelines").rglob("*.py"):
        if path.is_relative_to(PROJECT / "pipelines" / "deploy"):
            continue
        bad = {t for t in _imports(path) if t == "pipelines.deploy" or t.startswith("pipelines.deploy.")}
        if bad:
            offenders.append(f"{path.relative_to(PROJECT)}: {sorted(bad)}")
    assert not offenders, offenders


# Folders whose imports follow the rule "at the top, unless a comment says why not" (docs/architecture.md)
DEFERRED_RULE = ("pipelines", "fewshot_core")


def _unexplained_deferred_imports(path: Path) -> list[int]:
    """Line numbers of import blocks inside functions with no comment on or right above them; an import
    guarded by ``except ImportError`` (an optional extra) explains itself."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in t.handlers)
                for n in t.body}
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        blocks: list[list[ast.stmt]] = []
        found = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in optional]
        for node in sorted(found, key=lambda n: n.lineno):
            if blocks and node.lineno <= blocks[-1][-1].end_lineno + 2:  # one statement after another
                blocks[-1].append(node)
            else:
                blocks.append([node])
        for block in blocks:
            span = lines[block[0].lineno - 2:block[-1].end_lineno]
            if not any("#" in line for line in span):
                bad.append(block[0].lineno)
    return bad


def test_every_import_inside_a_function_says_why():
    offenders = [f"{path.relative_to(PROJECT)}:{line}" for folder in DEFERRED_RULE
                 for path in sorted((PROJECT / folder).rglob("*.py")) for line in _unexplained_deferred_imports(path)]
    assert not offenders, offenders


def test_the_deferred_import_check_finds_an_unexplained_one(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import json\n\n    return json\n\n\ndef g():\n    import torch  # heavy\n")
    assert _unexplained_deferred_imports(src) == [2]
