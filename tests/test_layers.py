"""The import layering of src/mapd (docs/architecture.md): read with ast, imports inside functions included.

A module imports only from its own layer or below; config.py imports nothing of mapd but errors; no two
modules import each other, directly or through others.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mapd"

# Lowest first. A name covers the module and, for a package, everything under it.
LAYERS: list[tuple[str, ...]] = [
    ("mapd", "mapd.errors", "mapd.log", "mapd.layout", "mapd.config"),
    ("mapd.io", "mapd.config_doc", "mapd.config_diff", "mapd.records", "mapd.secrets", "mapd.answers", "mapd.stats", "mapd.prompts", "mapd.review_score"),
    ("mapd.tasks", "mapd.config_file", "mapd.models", "mapd.generation"),
    ("mapd.llm", "mapd.serve"),
    ("mapd.stages", "mapd.student", "mapd.model_card"),
    ("mapd.runner", "mapd.report", "mapd.check", "mapd.cli"),
]
LEAF = {"mapd.config": {"mapd", "mapd.errors"}}  # the schema: nothing of mapd but errors
# Below a layer's reach but still not theirs: the call path returns results and plain statistics and knows no
# artifact record (the teach stage turns its statistics into records.TeacherStats).
NEVER = {"mapd.llm": {"mapd.records"}}


def module_name(path: Path) -> str:
    """The dotted name of a source file under src/mapd."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of a mapd module: the longest listed prefix decides; an unlisted module fails the test."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and docs/architecture.md"
    return best[0]


def mapd_imports(path: Path, module: str) -> set[str]:
    """Every mapd module that ``module`` imports anywhere in its file (packages count as their __init__)."""
    modules = set(map(module_name, SRC.rglob("*.py")))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]  # importlib.import_module("mapd.x")
        else:
            continue
        for name in names:
            if name.split(".")[0] != "mapd":
                continue
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the mapd modules it imports."""
    return {module_name(path): mapd_imports(path, module_name(path)) for path in sorted(SRC.rglob("*.py"))}


def test_every_module_imports_only_its_layer_or_below():
    wrong = [
        f"{module} (layer {layer_of(module) + 1}) imports {target} (layer {layer_of(target) + 1})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not wrong, "imports against the layering (docs/architecture.md):\n" + "\n".join(wrong)


@pytest.mark.parametrize("leaf", sorted(LEAF))
def test_leaf_modules_import_nothing_else_of_mapd(leaf):
    extra = import_graph()[leaf] - LEAF[leaf]
    assert not extra, f"{leaf} may import only {sorted(LEAF[leaf])} of mapd, imports {sorted(extra)}"


@pytest.mark.parametrize("package", sorted(NEVER))
def test_packages_keep_out_of_what_is_not_theirs(package):
    wrong = [f"{module} imports {target}" for module, targets in import_graph().items()
             if module == package or module.startswith(package + ".")
             for target in sorted(targets) if target in NEVER[package]]
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_should():
    """The checker itself: an upward import, a cycle and a relative import are all seen."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("mapd.config") < layer_of("mapd.tasks.gsm8k") < layer_of("mapd.llm.dispatch")
    assert layer_of("mapd.stages.review") > layer_of("mapd.prompts")
    graph = import_graph()
    assert "mapd.errors" in graph["mapd.config"]
    assert "mapd.llm.base" in graph["mapd.llm"]  # a package's __init__
    assert "mapd.tasks.base" in graph["mapd.tasks.gsm8k"]


def test_the_config_knows_every_task_the_tasks_package_loads():
    """config.TASK_NAMES (the names the schema accepts, kept without importing the tasks) is mapd.tasks' list."""
    from mapd.config import TASK_NAMES, TaskConfig, unknown_task
    from mapd.tasks import BENCHMARKS, get_task

    assert set(TASK_NAMES) == {*BENCHMARKS, "jsonl"}
    assert unknown_task("reasoning_gym:chain_sum") is None and unknown_task("reasoning_gym:") is not None
    with pytest.raises(Exception, match="unknown task 'arithmetic'"):
        get_task(TaskConfig(name="arithmetic"))
