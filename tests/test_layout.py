"""The package's import direction: data flows one way, and nothing imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asynccache"

#: Layers from the top down; a module may import only its own layer's or a lower layer's modules.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"asynccache", "asynccache.__main__", "asynccache.cli", "asynccache.trainer"}),
    frozenset({"asynccache.api"}),
    frozenset({"asynccache.pipeline"}),
    frozenset({"asynccache.sources", "asynccache.cache"}),
    # The image-reference grammar: what validating an entry and every source need.
    frozenset(
        {
            "asynccache.tree",
            "asynccache.entries",
            "asynccache.dataset",
            "asynccache.reference",
        }
    ),
    frozenset(
        {
            "asynccache._fs",
            "asynccache._threads",
            "asynccache.errors",
            "asynccache.config",
            "asynccache.shards",
        }
    ),
)


def module_name(path: Path) -> str:
    """The dotted name of a module file under the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every asynccache module a file imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("asynccache"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("asynccache"):
                continue
            folder = PACKAGE.parent / node.module.replace(".", "/")
            for alias in node.names:
                if (folder / alias.name).is_dir() or (folder / f"{alias.name}.py").exists():
                    found.add(f"{node.module}.{alias.name}")
                else:
                    found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    """Module name -> the asynccache modules it imports."""
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def role(module: str) -> str:
    """The role a module belongs to: its subpackage, or itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    """The layer index of a module (named in LAYERS itself), else of its role (0 is the top)."""
    for number, members in enumerate(LAYERS):
        if module in members:
            return number
    name = role(module)
    for number, members in enumerate(LAYERS):
        if name in members:
            return number
    raise AssertionError(f"{module} belongs to no layer; add its role to LAYERS")


def pinned(module: str) -> bool:
    """True for a module that LAYERS places apart from its role (it may not lean on its role)."""
    return module != role(module) and any(module in members for members in LAYERS)


def test_every_module_has_a_layer() -> None:
    for module in graph():
        layer_of(module)


def test_imports_only_point_down() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if (role(target) != role(module) or pinned(module)) and layer_of(target) < layer_of(module)
    ]
    assert upward == []


@pytest.mark.parametrize(
    "lower", ["asynccache.sources", "asynccache.cache", "asynccache.trainer", "asynccache.cli"]
)
def test_tree_imports_nothing_above_it(lower: str) -> None:
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if role(module) == "asynccache.tree"
        for target in targets
        if role(target) == lower
    ]
    assert offenders == []


def test_only_the_package_face_imports_cli_and_trainer() -> None:
    face = {"asynccache", "asynccache.__main__"}
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if role(target) in {"asynccache.cli", "asynccache.trainer"}
        and role(module) != role(target)
        and module not in face
    ]
    assert offenders == []


def test_sources_and_cache_do_not_lean_on_each_other() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if {role(module), role(target)} == {"asynccache.sources", "asynccache.cache"}
    ]
    assert offenders == []


def test_the_pipeline_reaches_trees_only_through_sources_and_cache() -> None:
    """Where bytes come from and how a tree is written stay behind the Source seam."""
    offenders = sorted(
        target for target in graph()["asynccache.pipeline"] if role(target) == "asynccache.tree"
    )
    assert offenders == []


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if target not in edges or target == module:
                continue
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert cycles == []


def test_the_checker_sees_a_breach(tmp_path: Path) -> None:
    """The graph reader finds an import written inside a function, not only at the top."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from asynccache.cli import main\n    return main\n")
    assert "asynccache.cli" in imports_of(sample)


def test_the_reference_grammar_sits_below_the_sources() -> None:
    """entries.py and every source use the grammar; the grammar uses no source."""
    assert not any(
        role(target) == "asynccache.sources" for target in graph()["asynccache.reference"]
    )
    assert layer_of("asynccache.reference") == layer_of("asynccache.entries")
    assert layer_of("asynccache.reference") > layer_of("asynccache.sources.docker")
