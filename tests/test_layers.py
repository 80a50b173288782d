"""The package's import graph: a strict order of layers and no circles (docs/architecture.md).

Every `import` counts, at any depth: module level, inside functions (a lazy import is still a dependency)
and under `if TYPE_CHECKING` (a type from a layer above is still knowledge of it). Only imports that run
can form a circular import, so the cycle check leaves out the TYPE_CHECKING ones: a type-only reference
back (chat.py naming RagBlend) is the Python idiom for two modules of one layer that know each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvchunks", "index", "ragblend")

# Lowest first. A module may import from its own layer or any below it; the longest matching prefix decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("records, codecs, backends, tiers, tree, budget, index", ("kvchunks", "index")),
    ("engine: the model, fusion, decode, precompute", ("ragblend.engine",)),
    ("storage: store, ingest, chunk KV, session records, maintenance", ("ragblend.storage",)),
    ("request path: contexts, answers, the Request, the request path, sessions",
     ("ragblend.contexts", "ragblend.answer", "ragblend.query", "ragblend.request", "ragblend.sessions")),
    ("facade: RagBlend, Chat", ("ragblend", "ragblend.api", "ragblend.chat")),
    ("surfaces: server, CLI, framework adapters, evaluation",
     ("ragblend.serve", "ragblend.cli", "ragblend.langchain", "ragblend.llamaindex", "ragblend.eval")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py"
    return max(matches)[1]


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for child in node.body for n in ast.walk(child) if hasattr(n, "lineno")}
    return lines


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs) for every import of the three packages in `path`; `from a import b`
    names a.b when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found += [(name, node.lineno, node.lineno not in type_only) for name in dict.fromkeys(names)
                  if name.split(".")[0] in PACKAGES]
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_belongs_to_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module, targets in graph().items():
        for target, line, _ in targets:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} (line {line}, layer '{LAYERS[layer_of(module)][0]}') imports {target} "
                              f"(layer '{LAYERS[layer_of(target)][0]}')")
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycles():
    edges = {module: sorted({t for t, _, runs in targets if runs and t != module})
             for module, targets in graph().items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in edges.get(module, []):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
