"""The package's modules import each other without a cycle (issue 13).

The graph is read statically from every ``import`` in every module, including those inside
functions (a deferred import is how a cycle hides), but not those under ``if TYPE_CHECKING:``,
which never run. Edges go to the module named, not to its parent packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import resilient_grpc

PACKAGE = Path(resilient_grpc.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["resilient_grpc", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(name: str, path: Path) -> set[str]:
    """The package modules that module ``name`` (at ``path``) imports when it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {module for module in found if module in MODULES and module != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := walk(target)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = {name: _imported(name, path) for name, path in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_deferred_import(tmp_path: Path) -> None:
    """A check that cannot fail proves nothing: a deferred import back is a cycle."""
    module = tmp_path / "policy.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import resilient_grpc.client\n"
        "def f():\n    from resilient_grpc.service_config import parse_service_config\n"
    )
    imported = _imported("resilient_grpc.core.policy", module)
    assert imported == {"resilient_grpc.service_config"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_seen() -> None:
    assert "resilient_grpc.core.service_config" in MODULES
    assert "resilient_grpc.aio" in MODULES
    assert len(MODULES) > 30
