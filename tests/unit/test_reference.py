"""The reference pages say what the code does: the command reference is generated from --help, and
the column tables of the scoring guide list exactly the columns radscan writes."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from radscan.scan import INVENTORY_COLUMNS
from radscan.worklist import REPORT_COLUMNS, STUDY_COLUMNS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_command_reference_is_what_help_says():
    reference = runpy.run_path(str(DOCS / "reference.py"))
    assert (DOCS / "commands.md").read_text(encoding="utf-8") == reference["render"](), \
        "docs/commands.md is out of date: run python docs/reference.py"


def _table_columns(section: str, order: tuple[str, ...]) -> list[str]:
    """The columns a Markdown table of docs/scoring.md names in its first cells, a range "`A` ... `B`"
    standing for A to B in `order`."""
    guide = (DOCS / "scoring.md").read_text(encoding="utf-8").split(section, 1)[1].split("\n## ", 1)[0]
    named = []
    for line in guide.splitlines():
        if not line.startswith("| `"):
            continue
        pieces = [re.findall(r"`([A-Za-z_0-9]+)`", piece) for piece in line.split("|")[1].split("...")]
        for before, after in zip(pieces, pieces[1:], strict=False):  # `A` ... `B`: A to B in `order`
            named += order[order.index(before[-1]) + 1:order.index(after[0])]
        named += [name for piece in pieces for name in piece]
    return named


@pytest.mark.parametrize(("section", "columns"), [("## Worklist columns", REPORT_COLUMNS),
                                                  ("## Inventory columns", INVENTORY_COLUMNS)])
def test_the_column_tables_list_every_column_once(section, columns):
    named = _table_columns(section, columns)
    assert sorted(named) == sorted(columns), (set(columns) - set(named), set(named) - set(columns))


def test_the_study_list_names_every_column():
    guide = (DOCS / "scoring.md").read_text(encoding="utf-8")
    listed = guide.split("`report_studies.csv`", 1)[1].split("- `report_residuals/`", 1)[0]
    named = {name for group in re.findall(r"`([^`]+)`", listed) for name in re.split(r",\s*", group)}
    identity = {"StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate", "Modality"}  # "its DICOM identity"
    assert set(STUDY_COLUMNS) - identity <= named, set(STUDY_COLUMNS) - identity - named
