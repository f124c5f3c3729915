"""docs/supported.md is the rendering of the tests' SUPPORTED lists (tests/support_table.py), and every test it
cites exists."""

from __future__ import annotations

from pathlib import Path

import support_table

ROOT = Path(__file__).resolve().parent.parent


def test_docs_supported_md_is_the_rendering_of_the_tests():
    rendered = support_table.render(support_table.rows())
    assert (ROOT / "docs" / "supported.md").read_text(encoding="utf-8") == rendered, (
        "docs/supported.md is stale: run `python tests/support_table.py > docs/supported.md`"
    )


def test_every_cited_test_exists():
    for row in support_table.rows():
        assert row["tests"], row
        for node in row["tests"]:
            path, name = node.split("::")
            function = name.split("[")[0]
            assert f"def {function}(" in (ROOT / path).read_text(encoding="utf-8"), node
