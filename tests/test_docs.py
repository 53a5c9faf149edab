"""The design document agrees with the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_the_stage_table_is_the_one_the_code_declares():
    from streams.stages import stage_table_markdown

    text = ARCHITECTURE.read_text()
    block = re.search(r"<!-- stage-table -->\n(.*?)\n<!-- /stage-table -->", text, re.S)
    assert block, "docs/architecture.md lost its stage-table markers"
    assert block.group(1) == stage_table_markdown()


def test_every_module_is_in_the_module_map():
    text = ARCHITECTURE.read_text()
    for pkg in ("broker", "streams"):
        for path in sorted((ROOT / pkg).iterdir()):
            name = path.stem if path.suffix == ".py" else f"{path.name}/"
            if name.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").exists()):
                continue
            assert f"`{name}`" in text, f"{pkg}/{path.name} is not described in docs/architecture.md"


def test_the_readme_links_the_design_document():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
