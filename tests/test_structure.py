"""The code's own rules, checked on its source: imports go down the layers and never round in a
circle ("Layers"), and no error is swallowed unsaid ("Errors"), both in docs/development.md."""

import ast
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
SOURCES = sorted(p for package in ("flows", "components") for p in (ROOT / package).rglob("*.py"))

# Bottom to top: a module imports its own layer's modules and those of the layers below it, never one
# above. Within a layer, no circle. A module belongs to the first layer whose prefix it has.
LAYERS = [
    ("components", ("components",)),
    ("setup", ("flows.setup",)),
    ("tracking", ("flows.tracking",)),
    ("orchestration", ("flows.orchestration",)),
    ("flows", ("flows.search", "flows.train", "flows.fitting", "flows.inference", "flows.retrain", "flows.housekeeping", "flows.runs",
               "flows.serve")),
    ("command line", ("flows.cli", "flows.arguments")),
]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in SOURCES}


def _imports(module: str) -> set[str]:
    """Every cnnflow module `module` imports, at its top or inside a function: `from package import
    submodule` counts as the submodule, `from package import name` as the package's __init__."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}".removeprefix("cnnflow.") in MODULES
                       else node.module for alias in node.names]
        else:
            continue
        found |= {t.removeprefix("cnnflow.") for t in targets if t.removeprefix("cnnflow.") in MODULES}
    return found - {module}


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> int:
    for number, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return number
    return -1


def test_every_module_is_in_a_layer():
    assert [m for m in MODULES if _layer(m) < 0 and m != "flows"] == []  # flows/__init__.py holds nothing


def test_imports_never_run_up_a_layer():
    upward = sorted(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
                    for module, targets in GRAPH.items() for target in targets if _layer(target) > _layer(module))
    assert not upward, "imports that run up the layers: " + "; ".join(upward)


def _circles() -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], itertools.count()

    def visit(node):
        index[node] = low[node] = next(counter)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(GRAPH[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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


def test_no_import_circle():
    assert _circles() == [], "modules that import each other, directly or round a circle: " + \
        "; ".join(" <-> ".join(circle) for circle in _circles())


def test_the_layer_check_sees_imports_inside_functions():
    """The check would pass vacuously if it read module-level imports alone: search.flow imports the
    train flow inside a function, and so does fitting the search's pruning channel."""
    assert "flows.train" in GRAPH["flows.search.flow"] and "flows.search.pruning" in GRAPH["flows.fitting"]

# Broad handlers that neither re-raise nor warn, each with the reason it may stay silent.
QUIET_ON_PURPOSE = {
    ("components/data/core.py", "_read_quietly"): "the read-ahead thread: load_data reads the same files "
                                                  "again on the main thread and raises there, in context",
    ("flows/train.py", "_retry_if_transient"): "a retry condition: the error is the failed task's result, "
                                               "which Prefect raises once no retry is left",
}
LOUD = {"warning", "error", "exception", "critical"}


def _broad(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException") for n in names)


def _says_what(node: ast.AST) -> bool:
    """A raise, or a log call at WARNING or above that names the error's type (`described(error)`,
    `type(error).__name__`, or the traceback through exc_info)."""
    for inner in ast.walk(node):
        if isinstance(inner, ast.Raise):
            return True
        if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr in LOUD:
            text = ast.unparse(inner)
            if "described(" in text or "type(" in text or "exc_info" in text or inner.func.attr == "exception":
                return True
    return False


def _quiet_handlers():
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in ast.walk(tree):
            broad = (isinstance(node, ast.ExceptHandler) and _broad(node)) or (
                isinstance(node, ast.With) and any("suppress(Exception" in ast.unparse(i.context_expr)
                                                   or "suppress(BaseException" in ast.unparse(i.context_expr)
                                                   for i in node.items))
            if broad and not _says_what(node):
                owner = min((f for f in functions if f.lineno <= node.lineno <= f.end_lineno),
                            key=lambda f: f.end_lineno - f.lineno, default=None)
                yield str(path.relative_to(ROOT)), owner.name if owner else "<module>", node.lineno


def test_no_broad_except_swallows_an_error_unsaid():
    quiet = [(file, function, line) for file, function, line in _quiet_handlers()
             if (file, function) not in QUIET_ON_PURPOSE]
    assert not quiet, ("a broad except (or suppress(Exception)) must re-raise, or log at WARNING with the error's "
                       "type and text (components.errors.described), or catch a named type: "
                       + ", ".join(f"{file}:{line} in {function}" for file, function, line in quiet))


def test_the_quiet_handlers_on_purpose_still_exist():
    found = {(file, function) for file, function, _ in _quiet_handlers()}
    assert set(QUIET_ON_PURPOSE) <= found, set(QUIET_ON_PURPOSE) - found


PRIVATE_MODULES = ("keras.src", "tensorflow.python", "mlflow.store", "mlflow.tracking.fluent", "prefect._internal",
                   "optuna.storages._")
PUBLIC_UNDERSCORED = {"os._exit"}  # documented, underscore and all


def _private_uses(path: Path) -> list[str]:
    uses = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner not in ("self", "cls") and f"{owner}.{node.attr}" not in PUBLIC_UNDERSCORED:
                uses.append(f"{owner}.{node.attr} (line {node.lineno})")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PRIVATE_MODULES):
            uses.append(f"from {node.module} import ... (line {node.lineno})")
    return uses


def test_private_names_of_libraries_are_used_in_compat_alone():
    """components/compat.py fences them, each with a test (tests/components/test_compat.py) that
    names the shim when a library changes; anywhere else a private name would break unseen."""
    found = {str(p.relative_to(ROOT)): _private_uses(p) for p in SOURCES if p.name != "compat.py"}
    assert {path: uses for path, uses in found.items() if uses} == {}
    assert _private_uses(ROOT / "components" / "compat.py")  # the check sees what compat holds


def _literal_tag_names(path: Path) -> list[str]:
    """String literals used as MLflow tag names: keys written by set_tags/set_tag, keys read from a
    run's tags, names in a filter string."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if called == "set_tags" and len(node.args) > 1 and isinstance(node.args[1], ast.Dict):
                found += [ast.unparse(k) for k in node.args[1].keys if isinstance(k, (ast.Constant, ast.JoinedStr))]
            if called == "set_tag" and len(node.args) > 1 and isinstance(node.args[1], (ast.Constant, ast.JoinedStr)):
                found.append(ast.unparse(node.args[1]))
            if called == "get" and isinstance(node.func, ast.Attribute) and ast.unparse(node.func.value).endswith("tags") \
                    and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
                found.append(ast.unparse(node.args[0]))
        if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("tags") \
                and isinstance(node.slice, (ast.Constant, ast.JoinedStr)):
            found.append(ast.unparse(node.slice))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                re.search(r"(^|\s)tags\.`?[a-z][\w.]*`?\s*(=|!=|LIKE)", node.value):  # a filter string
            found.append(repr(node.value))
    return found


def test_every_tag_name_is_a_constant_of_tracking_names():
    """flows/tracking/names.py is the one home of the names cnnflow gives MLflow tags: a literal
    elsewhere is a name a reader of the other side of the channel cannot find."""
    found = {str(p.relative_to(ROOT)): _literal_tag_names(p) for p in SOURCES if p.name != "names.py"}
    assert {path: names for path, names in found.items() if names} == {}


def test_mlflow_clients_are_made_in_one_place():
    """flows/tracking/store.py's mlflow_client(): one place to change how cnnflow talks to MLflow."""
    makers = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in SOURCES if p.name != "store.py"
              for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
              if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("MlflowClient")]
    assert makers == [], "MlflowClient() made outside flows/tracking/store.py: " + ", ".join(makers)


def test_importing_the_command_line_and_the_flows_starts_no_tensorflow():
    """TensorFlow must start after a run's thread settings are applied (flows/setup/runtime.py), and
    `cnnflow runs` or `--help` should not pay for it: Keras is imported inside the tasks that use it."""
    import subprocess
    import sys

    modules = ["cnnflow.flows.cli", "cnnflow.flows.train", "cnnflow.flows.inference", "cnnflow.flows.retrain",
               "cnnflow.flows.serve", "cnnflow.flows.runs", "cnnflow.flows.search.flow", "cnnflow.flows.housekeeping"]
    code = f"import sys; import {', '.join(modules)}; print(sorted({{'tensorflow', 'keras'}} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]", f"imported at module level by one of {modules}"
