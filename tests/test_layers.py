"""The import graph of pype/ against the layers that docs/internals.md lists.

Built from the source with ast, so that an import inside a function counts as much as
one at the top. Imports under `if TYPE_CHECKING:` are left out: they run only in a type
checker, never when Pype runs. Pype has no relative imports (ruff would show them). The
package itself (pype/__init__.py, the public names) stands in the layer of pype.client:
`import pype` or `from pype import Server` in a module of a lower layer is an upward
import.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = "pype"  # the package's __init__: the public names, in the public API's layer


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in (ROOT / "pype").rglob("*.py")}


def layers() -> dict[str, int]:
    """Module -> its layer number, from the numbered list under "## Layers" (an item's
    modules are the names in backquotes before its colon), and the package's own."""
    text = (ROOT / "docs" / "internals.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    found = {}
    items = re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", section, re.MULTILINE | re.DOTALL)
    for number, item in items:
        for name in re.findall(r"`([a-z0-9_.]+)`", item.split(":")[0]):
            found[f"pype.{name}"] = int(number)
    found[TOP] = found.get("pype.client", 0)
    found["pype.shards"] = 0  # an empty __init__
    return found


def imports(source: str, known: set[str]) -> set[str]:
    """The modules of `known` that `source` imports, anywhere but under TYPE_CHECKING."""
    tree = ast.parse(source)
    type_only = {id(child) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                            "typing.TYPE_CHECKING")
                 for statement in node.body for child in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # `from pype import protocol` names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path.read_text(), set(known)) for name, path in known.items()}


def upward_imports(edges: dict[str, set[str]], layer: dict[str, int]) -> list[str]:
    """Imports of a module of a higher layer (modules without a layer: see the next test)."""
    return sorted(f"{importer} (layer {layer[importer]}) imports {imported} "
                  f"(layer {layer[imported]})"
                  for importer, imported_set in edges.items() for imported in imported_set
                  if importer in layer and imported in layer and layer[imported] > layer[importer])


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A path that comes back to where it began, or None."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "visiting"
        for imported in sorted(edges.get(name, ())):
            if state.get(imported) == "visiting":
                return [*path, name, imported]
            if imported not in state:
                cycle = visit(imported, [*path, name])
                if cycle:
                    return cycle
        state[name] = "done"
        return None

    for name in sorted(edges):
        if name not in state:
            cycle = visit(name, [])
            if cycle:
                return cycle
    return None


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(layers()))
    assert not missing, f"modules that docs/internals.md's layer list does not name: {missing}"
    gone = sorted(set(layers()) - set(graph()))
    assert not gone, f"the layer list names modules that do not exist: {gone}"


def test_no_module_imports_a_layer_above_its_own():
    upward = upward_imports(graph(), layers())
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_find_what_they_look_for():
    known = {"pype", "pype.protocol", "pype.routing", "pype.client", "pype.shards.store"}
    source = ("from typing import TYPE_CHECKING\n"
              "from pype import protocol\n"
              "if TYPE_CHECKING:\n    from pype.client import Server\n"
              "if not TYPE_CHECKING:\n    import pype\n"
              "def late():\n    from pype.routing import Routes\n    import pype.shards.store\n")
    assert imports(source, known) == {"pype", "pype.protocol", "pype.routing",
                                      "pype.shards.store"}
    assert upward_imports({"a": {"b"}, "b": set()}, {"a": 1, "b": 2}) == [
        "a (layer 1) imports b (layer 2)"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
