"""MkDocs hook (mkdocs.yml `hooks:`): the pages' generated parts, made at every build from the code,
so the manual cannot disagree with it.

- `<!-- settings-reference -->`: every setting, from the settings schema (flows/setup/settings.py: type,
  range, accepted values) and the root config files (conf/: default and the comment that says what
  it does).
- `<!-- component-catalogue -->`: every registered component of every kind, with its arguments and
  the first line of its docstring (components/registry.py).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[1] / "conf"
# The files whose values are the defaults of their section: the root config and each default group file.
DEFAULT_FILES = {"": "config.yaml", "train.": "train/default.yaml", "data.": "data/digits.yaml",
                 "search.": "search/default.yaml"}


INTERNAL = ("overrides",)  # the command line's own overrides, recorded with the run; not a setting


def on_page_markdown(markdown: str, **_: Any) -> str:
    if "<!-- settings-reference -->" in markdown:
        markdown = markdown.replace("<!-- settings-reference -->", settings_reference())
    if "<!-- component-catalogue -->" in markdown:
        markdown = markdown.replace("<!-- component-catalogue -->", component_catalogue())
    return markdown


# ------------------------------------------------------------------------------------ settings

def settings_reference() -> str:
    from cnnflow.flows.setup.settings import Settings

    schema = Settings.model_json_schema()
    comments, defaults = documented_defaults()
    sections: dict[str, list[str]] = {}
    for key, spec in schema_fields(schema["properties"], schema["$defs"]):
        if key in INTERNAL:
            continue
        section = key.split(".")[0] if "." in key else "top level"
        row = (f"| `{key}` | {accepted(spec, schema['$defs'])} | {_cell(defaults.get(key, '-'))} | "
               f"{_cell(comments.get(key, ''))} |")
        sections.setdefault(section, []).append(row)
    out = []
    for section, rows in sections.items():
        out += [f"### {section}", "", "| setting | accepts | default | what it does |", "| --- | --- | --- | --- |",
                *rows, ""]
    return "\n".join(out)


def schema_fields(properties: dict, defs: dict, prefix: str = ""):
    """(dotted key, its JSON schema) of every setting, sections walked into."""
    for name, spec in properties.items():
        section = _section_of(spec, defs)
        if section:
            yield from schema_fields(defs[section]["properties"], defs, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", spec


def _section_of(spec: dict, defs: dict) -> str | None:
    refs = [spec.get("$ref")] + [option.get("$ref") for option in spec.get("anyOf", [])]
    names = [ref.split("/")[-1] for ref in refs if ref]
    return next((name for name in names if name != "Component" and "properties" in defs[name]), None)


def accepted(spec: dict, defs: dict) -> str:
    """What a setting accepts, from its schema: type, range, choices, form."""
    if "anyOf" in spec:
        return " or ".join(dict.fromkeys(accepted(option, defs) for option in spec["anyOf"]))
    if "$ref" in spec:
        return "a component: `{name: ..., its arguments}`"
    if "enum" in spec:
        return " \\| ".join(f"`{value}`" for value in spec["enum"])
    if "const" in spec:
        return f"`{spec['const']}`"
    kind = spec.get("type", "any")
    if kind == "null":
        return "`null`"
    if kind == "array":
        return f"a list of {accepted(spec.get('items', {}), defs)}"
    if kind == "object":
        values = spec.get("additionalProperties")
        return f"a mapping to {accepted(values, defs)}" if isinstance(values, dict) else "a mapping"
    bounds = [f">= {spec['minimum']}" if "minimum" in spec else "", f"> {spec['exclusiveMinimum']}"
              if "exclusiveMinimum" in spec else "", f"<= {spec['maximum']}" if "maximum" in spec else ""]
    words = {"integer": "an integer", "number": "a number", "string": "text", "boolean": "`true` \\| `false`"}
    text = " ".join([words.get(kind, kind), *filter(None, bounds)])
    if spec.get("description"):
        text += f" ({spec['description']})"
    elif spec.get("pattern"):
        text += f" matching `{spec['pattern']}`"
    return text


def documented_defaults() -> tuple[dict[str, str], dict[str, str]]:
    """(key -> the comment that describes it, key -> its default as written) from the default files."""
    comments: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for prefix, name in DEFAULT_FILES.items():
        path: list[tuple[int, str]] = []  # (indent, key) of the mapping being read
        last = None
        for line in (CONF / name).read_text().splitlines():
            group = re.match(r"^\s*- (\w+):\s*([^#]*?)\s*(?:#\s?(.*))?$", line)  # the defaults list
            if group and not prefix:
                defaults[group[1]], comments[group[1]] = f"{group[2]} (conf/{group[1]}/)", group[3] or ""
                continue
            match = re.match(r"^(\s*)([\w]+):\s*([^#]*?)\s*(?:#\s?(.*))?$", line)
            if match:
                indent = len(match[1])
                path = [(i, k) for i, k in path if i < indent]
                key = prefix + ".".join([k for _, k in path] + [match[2]])
                path.append((indent, match[2]))
                if match[3]:
                    defaults[key] = match[3]
                if match[4]:
                    comments[key] = match[4].strip()
                last = key if match[4] else None
            elif last and re.match(r"^\s{8,}#", line):  # a comment continued on the next line
                comments[last] += " " + line.strip().lstrip("#").strip()
            else:
                last = None
    return comments, defaults


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------------------------- components

def component_catalogue() -> str:
    from cnnflow.components import registry

    out = []
    for kind in registry.KINDS:
        out += [f"### {kind}", "", "| name | arguments | what it is |", "| --- | --- | --- |"]
        for name in registry.names(kind):
            build = registry.get(kind, name)
            out.append(f"| `{name}` | {_cell(arguments(build, kind))} | {_cell(first_line(build))} |")
        out.append("")
    return "\n".join(out)


def arguments(build, kind: str) -> str:
    """The arguments a config gives (those the flow passes itself are left out), with defaults."""
    from cnnflow.flows.setup.settings import PROVIDED

    given = set(PROVIDED.get(kind, ()))
    shown = []
    for parameter in inspect.signature(build).parameters.values():
        if parameter.name in given or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = "" if parameter.default is parameter.empty else f" = {parameter.default!r}"
        shown.append(f"`{parameter.name}{default}`")
    return ", ".join(shown) or "none"


def first_line(build) -> str:
    doc = inspect.getdoc(build) or ""
    return " ".join(doc.split("\n\n")[0].split())
