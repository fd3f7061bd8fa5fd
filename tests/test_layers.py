"""The package's layers (docs/architecture.md, "Layers"): imports point one way, down; no
module imports itself back; Flower is imported by the app layer only; a tool is imported by
nothing but its own test (tests/test_<tool>.py runs it; no other test leans on its code)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "feddm_flower"
# Bottom to top: a module imports from its own layer or from layers below it.
LAYERS = ("feddm_flower", "protocol", "config", "data", "task", "fed", "evaluation", "app", "tools")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    """``feddm_flower.<layer>[...]``, or the package root for its ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path) -> set[str]:
    """The absolute names ``path`` imports, at any depth (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def own_imports(name: str) -> set[str]:
    """The package's modules that module ``name`` imports (not its own parent packages)."""
    return {m for m in imports(MODULES[name]) if m in MODULES and not name.startswith(m + ".")}


def test_every_module_sits_in_a_layer() -> None:
    assert {layer(n) for n in MODULES} == set(LAYERS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    here = LAYERS.index(layer(name))
    up = sorted(m for m in own_imports(name) if LAYERS.index(layer(m)) > here)
    assert not up, f"{name} (layer {layer(name)!r}) imports from layers above it: {up}"


def test_no_import_cycle_between_modules() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        for dep in sorted(own_imports(name)):
            assert dep not in path, "import cycle: " + " -> ".join((*path, dep))
            if dep not in done:
                visit(dep, (*path, dep))
        done.add(name)

    for name in sorted(MODULES):
        visit(name, (name,))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_app_layer_imports_flower(name: str) -> None:
    flower = sorted(m for m in imports(MODULES[name]) if m == "flwr" or m.startswith("flwr."))
    assert layer(name) == "app" or not flower, (
        f"{name} imports Flower ({flower}); only feddm_flower.app may"
    )


def test_a_tool_is_imported_by_no_library_module_and_only_by_its_own_test() -> None:
    library = [p for n, p in MODULES.items() if layer(n) != "tools"]
    for path in library:
        tools = sorted(m for m in imports(path) if m.startswith("feddm_flower.tools"))
        assert not tools, f"{path.relative_to(REPO)} imports the tools {tools}"
    for path in (REPO / "tests").rglob("*.py"):
        own = "feddm_flower.tools." + path.stem.removeprefix("test_")
        tools = sorted(m for m in imports(path) if m.startswith("feddm_flower.tools"))
        others = [
            m for m in tools if m != "feddm_flower.tools" and own not in (m, m.rpartition(".")[0])
        ]
        assert not others, f"{path.relative_to(REPO)} imports the tools {others}"
