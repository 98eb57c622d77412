"""The user guide's generated parts (docs/hooks.py) cover the code: every setting of the schema with
what it accepts, its default and what it does; every registered component. (.ci/run builds the
whole site with `mkdocs build --strict`, which fails on a broken link or a page left out of nav.)"""

import importlib.util
import re
from pathlib import Path

from cnnflow.components import registry

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_reference_describes_every_setting_of_the_schema():
    from cnnflow.flows.setup.settings import Settings

    hooks = _hooks()
    schema = Settings.model_json_schema()
    keys = [key for key, _ in hooks.schema_fields(schema["properties"], schema["$defs"]) if key not in hooks.INTERNAL]
    rows = {row.split("`")[1]: row for row in hooks.settings_reference().splitlines() if row.startswith("| `")}
    assert sorted(rows) == sorted(keys)
    undescribed = [key for key, row in rows.items() if row.rstrip().endswith("|  |") or "| - |" in row]
    assert undescribed == [], "give each a default and a comment in conf/: " + ", ".join(undescribed)
    assert re.search(r"\| `data\.batch_size` \| an integer >= 1 <= 65536 \| 64 \| images per training step", rows["data.batch_size"])


def test_the_component_catalogue_lists_every_registered_component_with_its_arguments():
    catalogue = _hooks().component_catalogue()
    for kind in registry.KINDS:
        for name in registry.names(kind):
            assert f"| `{name}` |" in catalogue, (kind, name)
    # input_shape, num_classes, steps_per_epoch: the flow's to give
    assert "| `fast_cnn` | `width = 24`, `dropout_rate = 0.3`, `blocks = 3`, `head = 'flatten'` |" in catalogue


def test_every_guide_page_is_linked_from_readme_and_exists():
    linked = re.findall(r"\]\(docs/([\w-]+\.md)\)", (ROOT / "README.md").read_text())
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "index.md")
    assert sorted(linked) == pages


def test_the_deployments_serve_registers_are_the_ones_the_guide_lists():
    from cnnflow.flows.serve import deployment_names

    guide = (ROOT / "docs" / "runs.md").read_text()
    names = deployment_names("celeba")
    count = {5: "five", 6: "six", 7: "seven"}[len(names)]
    assert f"`cnnflow serve` registers {count} deployments" in guide
    for flow, name in names.items():
        assert f"`{flow}/{name}`" in guide, (flow, name)
