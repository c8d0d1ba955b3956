"""The notebooks in notebooks/ run top to bottom on the shapes model: each is executed with nbclient in a temporary
copy (the committed notebooks hold no outputs), and a cell that raises fails its test."""
import os
import shutil
import time
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel nbclient starts; the dev extra installs all three)
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_is_one_notebook_per_part():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), f"{path.name} is committed with outputs; strip them"
    # the kernel finds the library whether or not it is installed, and keeps its SVD cache out of the home directory
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.time()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell raises
    print(f"{path.name} ran in {time.time() - start:.0f} s")
