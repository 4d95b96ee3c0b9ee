"""The package's shape: imports run one way between the subpackages, no import circle, small modules and
functions, and one place for each piece of the training step.

Everything here reads the source with `ast` (nothing is imported), so lazy imports inside functions
count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flow_grpo"

LAYERS: list[tuple[str, ...]] = [
    ("seeding", "precision", "command_flags", "data"),
    ("algorithm",),
    ("models",),
    ("rewards",),
    ("reward_server", "testing"),
    ("run",),
    ("sampling",),
    ("training",),
    ("bench", "paper"),
    ("commands",),
    ("train",),
]
"""The package's parts from the bottom up: a part imports only from its own layer or those below."""

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES: dict[str, ast.Module] = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _imports(name: str) -> set[str]:
    """Modules of the package that module `name` imports anywhere in its body (functions included)."""
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, and a.b.c where c is a module
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(name: str) -> int:
    part = _part(name)
    if part == "__init__":
        return -1
    for index, members in enumerate(LAYERS):
        if part in members:
            return index
    raise AssertionError(f"flow_grpo.{part} belongs to no layer of tests/test_structure.py: add it to LAYERS")


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in GRAPH[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_the_import_walk_sees_lazy_imports():
    """The walk must see an import made inside a function, or it could miss the circles that matter."""
    tree = ast.parse("def f():\n    from flow_grpo.algorithm.sde import euler_step\n")
    TREES["flow_grpo.__probe__"], MODULES["flow_grpo.__probe__"] = tree, Path("probe.py")
    try:
        assert _imports("flow_grpo.__probe__") == {"flow_grpo.algorithm.sde"}
    finally:
        del TREES["flow_grpo.__probe__"], MODULES["flow_grpo.__probe__"]


def test_no_import_circle():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_circle():
    GRAPH["flow_grpo.algorithm.sde"].add("flow_grpo.algorithm.losses")
    GRAPH["flow_grpo.algorithm.losses"].add("flow_grpo.algorithm.sde")
    try:
        assert ["flow_grpo.algorithm.losses", "flow_grpo.algorithm.sde"] in _cycles()
    finally:
        GRAPH["flow_grpo.algorithm.sde"] = _imports("flow_grpo.algorithm.sde")
        GRAPH["flow_grpo.algorithm.losses"] = _imports("flow_grpo.algorithm.losses")


def test_imports_run_one_way_between_the_parts():
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(name)
    ]
    assert upward == [], "a part imports from a part above it (see LAYERS)"


def test_the_algorithm_core_imports_nothing_of_the_package():
    core = [name for name in MODULES if _part(name) == "algorithm"]
    assert core, "flow_grpo.algorithm is missing"
    outside = {f"{name} -> {t}" for name in core for t in GRAPH[name] if _part(t) != "algorithm"}
    assert outside == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_small(name):
    path = MODULES[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(TREES[name])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


class _Calls(ast.NodeVisitor):
    """Records `module:innermost enclosing function` of every call of a function named `function`."""

    def __init__(self, module: str, function: str) -> None:
        self.module, self.function, self.stack, self.sites = module, function, [], set()

    def _enter(self, node: ast.AST) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _enter

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if called == self.function:
            self.sites.add(f"{self.module}:{self.stack[-1] if self.stack else '<module>'}")
        self.generic_visit(node)


def _call_sites(function: str) -> list[str]:
    """`module:function` of every call of a function named `function` in the package."""
    sites = set()
    for name, tree in TREES.items():
        visitor = _Calls(name, function)
        visitor.visit(tree)
        sites |= visitor.sites
    return sorted(sites)


def test_one_place_forms_the_loss_and_scores_a_recorded_step():
    """The trainer, the benchmark and the memory preflight all train through `training_step`: the loss is formed
    in one place, a recorded step is scored in one place (`policy_step`), and the rollout is the only other
    caller of the stochastic step (it samples the step)."""
    assert _call_sites("grpo_loss") == ["flow_grpo.training.step:training_step"]
    assert _call_sites("stochastic_step") == ["flow_grpo.sampling.rollouts:rollout", "flow_grpo.training.step:policy_step"]
    assert _call_sites("disable_adapters") == ["flow_grpo.training.step:adapters_disabled"]
