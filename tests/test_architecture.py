"""The import graph of ``protect`` and ``attacks``: layers that only import downwards, no cycles,
no private names reached across modules, and ``protect`` never importing ``attacks``.

Run ``python tests/test_architecture.py`` to print the graph, layer by layer (what
``docs/architecture.md`` shows).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protect", "attacks")

# Lowest first. A module belongs to the layer of its longest matching prefix; it may import
# modules of its own layer and of the layers below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("protect.config", "protect.configs", "protect.budget", "protect.progress", "protect.precision",
              "protect.hardware", "protect.images", "protect.metrics", "protect.training_state", "protect.ranks",
              "protect.scale", "protect.autoset", "protect.augment")),
    ("models", ("protect.models",)),
    ("methods", ("protect.generator", "protect.methods", "protect.surrogates", "protect.cluster", "protect.protector",
                 "protect.distributed", "protect.t2ue")),
    ("runner", ("protect.runner",)),
    ("commands", ("protect", "protect.console", "protect.cli", "protect.t2ue.cli")),
    ("attacks", ("attacks",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "configs":  # shipped as protect.configs
        parts = ("protect", "configs", *parts[1:])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for folder in (*PACKAGES, "configs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of a project module in ``path``,
    wherever it is (top level or inside a function)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in PACKAGES:
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in known]
            found += [(module, []) for module in submodules]
            rest = [name for name in names if f"{node.module}.{name}" not in known]
            if rest or not submodules:
                found.append((node.module, rest))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, _ in imports(path, set(known)):
            if target != name:
                edges[name].add(target)
    return edges


def layer_of(module: str) -> int:
    best, best_length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def test_every_module_has_a_layer() -> None:
    assert [m for m in graph() if layer_of(m) < 0] == []


def test_imports_only_go_down_the_layers() -> None:
    upward = [
        f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]
    assert upward == []


def test_protect_never_imports_attacks() -> None:
    assert [(s, t) for s, ts in graph().items() for t in ts if s.startswith("protect") and t.startswith("attacks")] == []


def test_no_import_cycles() -> None:
    edges, state, cycles = graph(), {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_names_imported_across_modules() -> None:
    known = modules()
    private = [
        f"{name} imports {target}.{taken}"
        for name, path in known.items()
        for target, names in imports(path, set(known))
        for taken in names
        if taken.startswith("_") and target != name
    ]
    assert private == []


def print_graph() -> None:
    edges = graph()
    by_layer: dict[int, list[str]] = defaultdict(list)
    for module in edges:
        by_layer[layer_of(module)].append(module)
    for index, (layer, _) in enumerate(LAYERS):
        print(f"## {layer}")
        for module in sorted(by_layer[index]):
            print(f"{module} -> {', '.join(sorted(edges[module])) or '(nothing of the project)'}")
        print()


if __name__ == "__main__":
    sys.exit(print_graph())
