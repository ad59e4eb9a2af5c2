"""The package layout: graftr's modules import each other without cycles.

Every ``import`` statement counts, at the top of a module or inside a function: a cycle through a function-level
import is code in the wrong module, the same as one at import time. The cycles by design are late bindings, each
one function-level import named below and left out of the graph: the adapter registry's plugin import
(``graftr.registry`` imports ``graftr.adapters.config`` for the built-in kinds' configs, and ``graftr.adapters`` to
name the modules it imports to register them; both import the registry to subclass and register). The Hugging Face
face of a grafted model (:mod:`graftr.hf`: ``save_pretrained``, ``from_pretrained``, ``load_adapter``,
``generate``) is built above the core and the modules it calls, which never import it. Importing ``a.b.c`` also
imports the
packages ``a.b`` and ``a`` (their ``__init__``), except the packages the importing module is itself inside, and
except the root ``graftr`` (the public API facade, which every module's import initialises first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import graftr

ROOT = Path(graftr.__file__).parent
PLUGIN_IMPORTS = [("graftr.registry", "graftr.adapters"), ("graftr.registry", "graftr.adapters.config")]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["graftr", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``module → {graftr modules it imports}`` from every import statement in graftr's source."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith("graftr"):
                    continue
                parts = target.split(".")
                for depth in range(2, len(parts) + 1):  # the module and every package above it but the root
                    imported = ".".join(parts[:depth])
                    if imported in modules and imported != name and not name.startswith(imported + "."):
                        graph[name].add(imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_but_the_plugin_import():
    graph = import_graph()
    for importer, imported in PLUGIN_IMPORTS:
        assert imported in graph[importer]  # the plugin import exists (else this test checks nothing)
    assert cycles(graph), "the plugin import closes a cycle: the check below would find one without the exception"
    for importer, imported in PLUGIN_IMPORTS:
        graph[importer].discard(imported)
    assert cycles(graph) == []


def test_the_hugging_face_face_is_built_above_the_core():
    """graftr.hf (the PreTrainedModel a grafted model is for HF tools) imports the core and the formats, loaders and
    generation its methods call; of graftr's modules only the public facade and the lm-eval command (which hands
    the model to the harness's HFLM) import it."""
    graph = import_graph()
    assert {"graftr.grafted", "graftr.formats", "graftr.formats.graftr", "graftr.load", "graftr.generate"} \
        <= graph["graftr.hf"]
    assert sorted(m for m, imported in graph.items() if "graftr.hf" in imported) == ["graftr", "graftr.harness"]


def test_commands_print_through_the_console_module():
    """Command modules import their console from graftr.console, never from the CLI that imports them."""
    graph = import_graph()
    assert [m for m, imported in graph.items() if "graftr.cli" in imported] == []
