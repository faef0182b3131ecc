"""The house plan, checked: which room may import which, and no import cycle anywhere.

Rooms, bottom to top (a room imports only from rooms listed for it; every import counts, also one inside a
function, since it runs as surely as one at the top):

    runtime     the process runtime and the checkpoint layout          imports nothing of the project
    backbones   the networks                                           runtime
    heads       the class-sharded losses                               runtime
    data        RecordIO, loaders, synthetic data, .bin files          runtime
    eval        verification, IJB, MegaFace, ONNX, tables              runtime, backbones, data
    trainer     config, engine, loop, checkpoints                      all of the above

bench/, scripts/ and tests/ stand outside the house: they may import any room, and no room imports them; tests may
import bench (the rank spawner, the sync counter), bench and scripts never import tests.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "runtime": set(),
    "backbones": {"runtime"},
    "heads": {"runtime"},
    "data": {"runtime"},
    "eval": {"runtime", "backbones", "data"},
    "trainer": {"runtime", "backbones", "heads", "data", "eval"},
}
OUTSIDE = {"bench", "scripts", "tests"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for room in [*ALLOWED, *OUTSIDE]:
        for path in sorted((REPO / room).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . / from ..x
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` names the submodule when there is one, else the package itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a module: the longest known prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = project_modules()
    return modules, {name: imports_of(path, name, modules) for name, path in modules.items()}


def room(module: str) -> str:
    return module.split(".")[0]


def test_every_room_imports_only_what_lies_below_it():
    modules, edges = graph()
    wrong = []
    for name, targets in edges.items():
        src = room(name)
        if src == "tests":
            continue
        for target, line in targets:
            dst = room(target)
            if src in OUTSIDE:
                if dst == "tests":
                    wrong.append(f"{modules[name].relative_to(REPO)}:{line} imports {target} (only tests import tests)")
            elif dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{modules[name].relative_to(REPO)}:{line} imports {target} ({src} may import "
                             f"{', '.join(sorted(ALLOWED[src])) or 'nothing of the project'})")
    assert not wrong, "imports against the house plan:\n" + "\n".join(wrong)


def find_cycle(edges: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target, _ in edges.get(node, []):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    _, edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    """The two checks above would fail on the faults they look for (a checker that sees nothing proves nothing)."""
    assert find_cycle({"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [("b", 1)], "b": [("c", 1)], "c": []}) is None
    modules = project_modules()
    assert "heads.comm" in modules and "runtime.process" in modules and "data.loader" in modules
    source = tmp_path / "probe.py"
    source.write_text("import torch\nfrom trainer import train\n\ndef f():\n    from . import comm\n")
    assert imports_of(source, "heads.probe", modules) == [("trainer.train", 2), ("heads.comm", 5)]
