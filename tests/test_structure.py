"""The package's shape, checked: samplers, teachers and the trainer never import each other;
code that exists for speed lives in fast/, which imports none of them; no import cycles; no
source file far over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "opd"
# the trainer's side of the step: the losses and their maths (train.py and build.py wire the
# samplers, teachers and trainer together, and may import all three)
TRAINER = {"opd.losses", "opd.divergences", "opd.objectives", "opd.rewards", "opd.stats"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every opd module -> the opd modules it imports (at top level or inside functions)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opd"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("opd")}
        graph[module_name(path)] = found
    return {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}


def test_samplers_teachers_and_trainer_do_not_import_each_other():
    graph = imports()
    groups = {
        "samplers": lambda m: m.startswith("opd.samplers"),
        "teachers": lambda m: m.startswith("opd.teachers"),
        "trainer": lambda m: m in TRAINER,
    }
    for name, inside in groups.items():
        for module, deps in graph.items():
            if not inside(module):
                continue
            for other, other_inside in groups.items():
                bad = [d for d in deps if other != name and other_inside(d)]
                assert not bad, f"{module} ({name}) imports {bad} ({other})"
    for module, deps in graph.items():
        if module.startswith("opd.fast"):
            bad = [d for d in deps if any(inside(d) for inside in groups.values())]
            assert not bad, f"{module} (fast/) imports {bad}"


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_source_file_is_far_over_400_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long
