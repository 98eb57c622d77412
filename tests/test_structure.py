"""The code's own rules, checked on its source: no silently swallowed error (docs/development.md,
"Errors")."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
SOURCES = sorted(p for package in ("flows", "components") for p in (ROOT / package).rglob("*.py"))

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
