"""The package's shape, checked by parsing its source (no import): imports follow the data flow (no cycle,
no project import inside a function, no module importing a later stage), only sources.py knows the
synthetic world, and no code path reaches into a library's private modules or attributes."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "ramoe_ray"

# The data flow, first to last (docs/architecture.md). A module may import only modules before it.
ORDER = [
    "cache", "config",                                    # keys and atomic writes; the typed config
    "models", "tasks", "tokenizer", "losses",             # the family table; task formats and data; loss math
    "routing_stats", "stats", "cost",                     # stage-2 math; paired comparison statistics; the cost model;
    "lora", "expert_delta",                               # expert LoRA;
    "inference",                                          # full-weight expert delta (RISE); running a model over prompts
    "synthetic", "sources", "memory",                     # the synthetic world; references -> local paths; GPU memory fit
    "taxonomy", "experts",                                # stage 1; stage 2
    "base_cache", "asha",                                 # stage 3's per-cell cache of the base-model passes; early stopping
    "train_worker", "train", "evaluate",                  # stage 3 (per worker, driver); stage 4
    "grid", "tracking", "trial",                          # the sweep: grid, MLflow, one trial,
    "sweep", "calibrate", "dryrun",                       # the driver, a short sweep's rates, its dry run;
    "report",                                             # the report
    "cli",
]
# Private internals a code path may not use: module paths and attributes (step 2 of the structure issue).
PRIVATE_MODULES = ("deepspeed.utils.groups", "deepspeed.comm.comm")
ALLOWED_PRIVATE: set[tuple[str, str]] = set()  # (module, attribute) of isolated, documented workarounds


@functools.cache
def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _project_imports(node: ast.AST) -> list[tuple[str, int]]:
    """(imported project module, line) of an import statement."""
    out = []
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "ramoe_ray":
            out += [(a.name, node.lineno) for a in node.names]
        elif node.module.startswith("ramoe_ray."):
            out.append((node.module.split(".")[1], node.lineno))
    elif isinstance(node, ast.Import):
        out += [(a.name.split(".")[1], node.lineno) for a in node.names if a.name.startswith("ramoe_ray.")]
    return out


def _top_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    return [imp for stmt in tree.body for imp in _project_imports(stmt)]


def _imports_inside_functions(tree: ast.Module) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                out += _project_imports(inner)
    return sorted(set(out))


def test_every_module_has_a_place_in_the_data_flow():
    missing = sorted(set(_modules()) - set(ORDER))
    assert not missing, f"modules not in ORDER (place them in the data flow, here and in docs/architecture.md): {missing}"


def test_no_project_import_inside_a_function():
    bad = [f"{name}.py:{line} imports {what}" for name, tree in _modules().items()
           for what, line in _imports_inside_functions(tree)]
    assert not bad, "project imports inside functions hide the dependency order:\n" + "\n".join(bad)


def test_imports_follow_the_data_flow_and_have_no_cycle():
    rank = {m: i for i, m in enumerate(ORDER)}
    bad = []
    for name, tree in _modules().items():
        for what, line in _top_level_imports(tree):
            if what not in rank:
                bad.append(f"{name}.py:{line} imports {what}, which is not a module of the package")
            elif rank[what] >= rank.get(name, -1):
                bad.append(f"{name}.py:{line} imports {what}, which comes later in the data flow")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by depth-first search (a back edge closes one)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_at_all():
    graph = {name: {w for w, _ in _top_level_imports(tree) + _imports_inside_functions(tree)}
             for name, tree in _modules().items()}
    assert _cycles(graph) == []


def test_only_sources_knows_the_synthetic_world():
    users = sorted(name for name, tree in _modules().items()
                   if "synthetic" in {w for w, _ in _top_level_imports(tree) + _imports_inside_functions(tree)})
    assert users == ["sources"]


def _private_uses(name: str, tree: ast.Module) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith(("ramoe_ray", "__future__")):
            parts = node.module.split(".") + [a.name for a in node.names]
            full = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            if any(p.startswith("_") and not p.startswith("__") for p in parts) or full & set(PRIVATE_MODULES):
                out.append(f"{name}.py:{node.lineno} from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if any(p.startswith("_") and not p.startswith("__") for p in parts) or a.name in PRIVATE_MODULES:
                    out.append(f"{name}.py:{node.lineno} import {a.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if (name, node.attr) not in ALLOWED_PRIVATE:
                out.append(f"{name}.py:{node.lineno} .{node.attr}")
    return out


def test_private_use_detector():
    tree = ast.parse("import ray.train._internal.session as s\nfrom deepspeed.utils import groups\n"
                     "import deepspeed.comm.comm as c\nx = s._session\ny = self._ok\n")
    assert len(_private_uses("m", tree)) == 3 + 1  # the swap module, two group-globals modules, the attribute
    assert _private_uses("m", ast.parse("from deepspeed.utils import set_z3_leaf_modules")) == []


def test_no_private_library_internals():
    bad = [line for name, tree in _modules().items() for line in _private_uses(name, tree)]
    assert not bad, "private modules or attributes used:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", ["config", "models", "tasks", "taxonomy", "experts", "train", "evaluate"])
def test_config_models_tasks_and_stages_never_name_the_synthetic_module(name):
    tree = _modules()[name]
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "synthetic" not in names
