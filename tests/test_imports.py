"""Boundaries between the packages, read from the source with `ast` (nothing is imported):

- no import cycle among the modules of `pipeline/`, `spaceclip/` and `flows/`, counting imports inside functions
  too (a lazy import is still a dependency; it only hides the cycle from the interpreter);
- the model library `spaceclip/` opens no network and runs no installer: none of its modules imports
  subprocess, pip, urllib, requests or onnx (fetching and converting weights is the pipeline's job).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "spaceclip", "flows")

# Import edges exempt from the no-cycle rule: none (store creation lives in extraction, render-if-missing with the
# generator).
ALLOWED_EDGES: set = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import in `tree` loads (`from a import b` -> a.b, which resolves to module a.b or, when b
    is a name inside a, to a), at any depth, except under `if TYPE_CHECKING:`, which never runs."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.update(f"{source}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


@functools.cache
def _graph() -> nx.DiGraph:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in imported_names(tree, module, path.name == "__init__.py"):
            # the most specific module the name loads: `pipeline.synth.write.render_plan` -> pipeline.synth.write
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph.add_edge(module, name)
    return graph


def import_graph() -> nx.DiGraph:
    """The graph of imports between the modules of PACKAGES (a fresh copy: tests remove edges from it)."""
    return _graph().copy()


def test_import_graph_reads_the_source():
    """The graph holds the edges the source states, so an empty graph cannot pass the cycle test below."""
    graph = import_graph()
    assert graph.has_edge("pipeline.layout", "spaceclip.encoder")  # `from spaceclip.encoder import FrozenEncoder`
    assert graph.has_edge("pipeline.synth.write", "pipeline.datasets")  # the generator writes the reader's format
    assert graph.has_edge("flows.cli", "pipeline.errors")  # an import inside a function counts
    assert graph.number_of_nodes() > 40


def test_no_import_cycles():
    graph = import_graph()
    graph.remove_edges_from(ALLOWED_EDGES)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}; cycle: {nx.find_cycle(graph)}"


def test_package_init_reexports_are_not_cycles():
    """A package's `__init__` importing its own submodules, which import their siblings, is how packages are
    written: the graph has the edges package -> submodule but no submodule -> package edge from those."""
    graph = import_graph()
    assert graph.has_edge("pipeline.synth", "pipeline.synth.render")
    assert not graph.has_edge("pipeline.synth.render", "pipeline.synth")


FORBIDDEN_IN_SPACECLIP = ("subprocess", "pip", "urllib", "requests", "onnx", "onnxruntime", "http", "socket")


def test_spaceclip_opens_no_network_and_runs_no_installer():
    offenders = []
    for path in sorted((ROOT / "spaceclip").rglob("*.py")):
        module = module_name(path)
        for name in imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if name.split(".")[0] in FORBIDDEN_IN_SPACECLIP:
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, f"spaceclip imports {offenders}: fetch and convert weights on the pipeline side"
