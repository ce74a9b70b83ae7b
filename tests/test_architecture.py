"""The layout as a checked fact: no import cycles among tvq's modules (counting the imports
hidden inside functions), and no function-local import except to defer a third-party (heavy
or optional) dependency, or a command's implementation in the CLI (so `tvq --help` stays
fast). tvq's own modules and the standard library are imported at the top."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tvq"  # read as text: importing is not needed
CLI_PACKAGES = ("tvq.cli", "tvq.merge_cli", "tvq.bench.cli", "tvq.bench.run_cmd", "tvq.bench.suites")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(importer: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported tvq module, inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never executed
            if isinstance(child, ast.Import):
                out.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(name, child, path.name == "__init__.py")
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    out.append((sub if sub in known else target, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for target, _ in imports_of(name, path, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("tvq") and target != name and not name.startswith(f"{target}."):
                targets.add(target)
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_function_local_imports_only_defer_heavy_dependencies() -> None:
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, in_function in imports_of(name, path, set(mods)):
            if not in_function:
                continue
            root = target.split(".")[0]
            if name.startswith(CLI_PACKAGES):
                continue  # a command's implementation, loaded when the command runs
            if root != "tvq" and root not in sys.stdlib_module_names:
                continue  # a third-party library deferred on purpose (optional extras, heavy imports)
            bad.append(f"{name} imports {target} inside a function")
    assert not bad, "\n".join(bad)
