"""Executes notebooks/quickstart.ipynb top to bottom with a tiny training budget."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_TIMESTEPS", str(16 * 128 * 2))
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert os.path.exists(tmp_path / "run" / "metrics.csv")
