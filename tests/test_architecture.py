"""The layers of ARCHITECTURE.md hold: every import in llmcli/ (module level and inside functions) points to
the same layer or a lower one, there is no import cycle, and imports inside functions appear only where they
keep torch out of start-up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llmcli"
HEAVY = ("torch", "safetensors", "tokenizers", "numpy")  # what `llmcli --help` must not import
# extras that may be missing: imported where used
OPTIONAL = ("transformers", "peft", "matplotlib", "pydoc_data", "tensorboard", "torch.utils.tensorboard", "gguf",
            "torch.utils.cpp_extension")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def read_layers() -> dict[str, int]:
    """ARCHITECTURE.md's layer table: module or package name -> layer number."""
    layers = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        row = re.match(r"^\| (\d+) \| [^|]+ \| ([^|]+) \|", line)
        if row:
            for name in re.findall(r"`([\w.]+)`", row.group(2)):
                layers[name] = int(row.group(1))
    return layers


LAYERS = read_layers()


def layer_of(module: str) -> int | None:
    """The layer of the longest listed name that is the module or a package above it."""
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return LAYERS[name]
    return None


def resolve(node: ast.ImportFrom | ast.Import, here: str) -> list[str]:
    """The modules an import statement loads (llmcli ones resolved to files; others by top-level name)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = here.split(".") if MODULES[here].name == "__init__.py" else here.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return found or [base]


def imports() -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import statement in llmcli/."""
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges += [(module, target, id(node) in nested) for target in resolve(node, module)]
    return edges


EDGES = imports()
INTERNAL = [(a, b, lazy) for a, b, lazy in EDGES if b == "llmcli" or b.startswith("llmcli.")]


def test_the_table_names_real_modules_and_every_module_has_a_layer():
    unknown = [name for name in LAYERS if name not in MODULES]
    assert not unknown, f"ARCHITECTURE.md names modules that do not exist: {unknown}"
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced, f"modules with no layer in ARCHITECTURE.md: {unplaced}"


def test_imports_only_point_down():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, b, _ in INTERNAL if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _ in INTERNAL:
        if a != b:
            graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def startup_modules() -> set[str]:
    """What `llmcli --help` loads: the CLI and everything its modules import at module level (with the packages
    above each, whose __init__ runs first)."""
    seen, todo = set(), ["llmcli.__main__", "llmcli.cli"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += [b for a, b, lazy in INTERNAL if a == module and not lazy]
    return seen


def test_start_up_imports_no_torch():
    heavy = [f"{a} imports {b}" for a, b, lazy in EDGES
             if a in startup_modules() and not lazy and b.split(".")[0] in HEAVY]
    assert not heavy, heavy


def test_imports_inside_functions_only_keep_torch_out_of_start_up():
    startup = startup_modules()
    needless = sorted({f"{a}: {b}" for a, b, lazy in EDGES
                       if lazy and a not in startup and b.split(".")[0] not in OPTIONAL and b not in OPTIONAL})
    assert not needless, ("imports inside functions of modules that start-up does not load (move them to the "
                          "top):\n" + "\n".join(needless))


def test_packages_that_span_layers_import_nothing_in_their_init():
    for package, path in MODULES.items():
        if path.name != "__init__.py" or package == "llmcli":
            continue
        members = {layer_of(m) for m in MODULES if m.startswith(package + ".")}
        if len(members) > 1:
            assert not [b for a, b, _ in INTERNAL if a == package], f"{package}/__init__.py imports llmcli modules"
