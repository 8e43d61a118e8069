"""The package's import graph has no cycle, counting imports inside functions too (a lazy import that only
dodges a cycle is still a cycle), and importing the package has no side effects. Standard library only:
`python -m pytest tests/test_imports.py` is the check anyone can run."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # installed as fastcifar.kernels (pyproject's package-dir)
        parts = ["fastcifar", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(node: ast.AST):
    """Every node that can run: all but the bodies of `if TYPE_CHECKING:` (annotations only)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield from _runtime_nodes(child)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Package modules `path` imports anywhere in its body (module level and inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from fastcifar.x import y` imports fastcifar.x
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [*ROOT.glob("fastcifar/**/*.py"), *ROOT.glob("kernels/*.py")]
    modules = {_module_of(p): p for p in files}
    known = set(modules)
    # A package's __init__ runs when any of its modules is imported: that edge is implicit, not a cycle.
    return {m: {d for d in _imports(p, m, known) if not m.startswith(d + ".")} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "fastcifar.train" in graph["fastcifar.run"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_importing_the_package_sets_nothing():
    code = ("import torch, fastcifar.cli, fastcifar.run, fastcifar.distributed, fastcifar.bench.suite; "
            "print(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), "
            "torch.backends.cudnn.benchmark)")
    baseline = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads(), "
                               "torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)"],
                              capture_output=True, text=True, check=True).stdout
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert after == baseline
