"""The tutorials (docs/tutorials/*.ipynb) run top to bottom with the smoke budget."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parent.parent / "docs" / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_there_are_six_tutorials():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorial_runs_and_is_stored_without_outputs(path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the outputs"
    monkeypatch.setenv("PYRO_FDIV_SMOKE", "1")
    if "PYRO_FDIV_DATA" not in os.environ and DATA.is_dir():
        monkeypatch.setenv("PYRO_FDIV_DATA", str(DATA))
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": TUTORIALS}}
    )
    client.execute()
