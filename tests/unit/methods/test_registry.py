"""The registry is the one place that knows a method: its entries agree with the classes they build, an
entry passes through ``get`` unchanged, and what the CLI and the pipeline decide about a method they read
from its entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fewshot_core.errors import FsadError
from fewshot_core.methods import registry


@pytest.mark.parametrize("name", registry.names())
def test_registry_entries_agree_with_their_classes(name):
    entry = registry.get(name)
    cls = entry.load_class()
    assert cls.input_kind == entry.input_kind
    assert entry.meta_pool == hasattr(cls, "meta_fit")  # the flag the CLI, protocol and sweep read
    assert entry.needs_accelerator == (entry.input_kind == registry.IMAGES)


def test_the_worker_pool_follows_the_registry():
    from pipelines.placement.steps import CPU_POOL, GPU_POOL, pool_for_method

    pools = {n: pool_for_method(registry.get(n)) for n in registry.names()}
    assert {n for n, p in pools.items() if p == GPU_POOL} == set(registry.names(input_kind=registry.IMAGES))
    assert pools["patchcore"] == pools["musc"] == pools["caml"] == CPU_POOL and pools["pmf"] == GPU_POOL


def test_get_takes_a_name_or_an_entry_and_register_refuses_a_shadow(monkeypatch):
    entry = registry.get("musc")
    assert registry.get(entry, protocol=registry.TRANSDUCTIVE) is entry
    with pytest.raises(FsadError, match="not available under the oneclass protocol"):
        registry.get(entry, protocol=registry.ONECLASS)
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    with pytest.raises(FsadError, match="already registered"):
        registry.register(registry.MethodEntry("musc", registry.ONECLASS, registry.PATCHES, "x:Y", "shadow"))
    new = registry.register(registry.MethodEntry("newone", registry.ONECLASS, registry.PATCHES, "x:Y", "new"))
    assert registry.get("newone") is new and "newone" in registry.names(protocol=registry.SUPERVISED)


def test_method_help_lists_every_registered_method_by_protocol():
    out = subprocess.run([sys.executable, "-m", "fewshot_core", "evaluate", "--help"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[3], timeout=120).stdout
    text = " ".join(out.split())
    for protocol, label in ((registry.ONECLASS, "one-class"), (registry.SUPERVISED, "supervised"),
                            (registry.TRANSDUCTIVE, "transductive")):
        assert f"{label}: {', '.join(registry.names(protocol=protocol))}" in text


def test_no_protocol_names_a_method():
    """The protocols ask the registry (input kind, meta_pool, protocol_params), never test or import a method."""
    import ast

    methods = set(registry.names())
    modules = {f"fewshot_core.methods.{e.factory.partition(':')[0].rsplit('.', 1)[1]}"
               for e in registry.REGISTRY.values()}
    found = []
    for path in sorted((Path(__file__).resolve().parents[3] / "fewshot_core" / "evaluation").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                found.append(f"{path.name}: imports {node.module}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in methods:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_the_methods_folder_holds_methods_only():
    """One file per registered method beside the contract, the registry and the trained detectors' base;
    a part that methods share lives in methods/components/."""
    folder = Path(__file__).resolve().parents[3] / "fewshot_core" / "methods"
    methods = {e.factory.partition(":")[0] for e in registry.REGISTRY.values()
               if e.factory.startswith("fewshot_core.methods.")}
    files = {f"fewshot_core.methods.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__"}
    frame = {f"fewshot_core.methods.{name}" for name in ("base", "registry", "trained")}
    assert files - frame == methods
