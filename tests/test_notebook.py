"""Executes notebooks/quickstart.ipynb top to bottom with a tiny training budget; every cell
that shows a figure must produce an image (a backend that displays nothing fails here)."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_TIMESTEPS", str(16 * 128 * 2))
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path / "run"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [o for cell in code for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert os.path.exists(tmp_path / "run" / "metrics.csv")
    plotting = [cell for cell in code if "plt.show()" in cell.source]
    assert len(plotting) >= 2
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == cell.source.count("plt.show()"), cell.source[:200]
