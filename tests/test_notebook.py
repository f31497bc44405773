"""Executes every notebook in notebooks/ top to bottom with a tiny training budget (results
directories are read as they are, present, partial or absent); every cell that shows a figure
must produce an image (a backend that displays nothing fails here), and no notebook may reach
into the project's private (underscore) names."""

from __future__ import annotations

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(
    f[: -len(".ipynb")] for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb")
)
# Per notebook: the tiny budget (env vars) and the env var naming its run directory.
TINY = {
    "quickstart": ({"QUICKSTART_TIMESTEPS": str(16 * 128 * 2)}, "QUICKSTART_OUT"),
    "credit_assignment": ({"CREDIT_ASSIGNMENT_TIMESTEPS": "2000"}, "CREDIT_ASSIGNMENT_OUT"),
    "calibration": (
        {"CALIBRATION_TIMESTEPS": "4096", "CALIBRATION_EPISODES": "3"},
        "CALIBRATION_OUT",
    ),
    "meta_rl": ({"META_RL_TIMESTEPS": "3200"}, "META_RL_OUT"),
}
PROJECT = r"(?:train|run|shm_jax|envs|experiments|report|suites|calibration|credit_assign|grid)"
PRIVATE = re.compile(rf"\b{PROJECT}\._\w+|from\s+{PROJECT}(?:\.\w+)*\s+import\s+[^\n]*\b_\w+")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_plots(name, tmp_path, monkeypatch):
    assert name in TINY, f"notebooks/{name}.ipynb has no tiny budget in tests/test_notebook.py"
    budget, out_var = TINY[name]
    for var, value in budget.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv(out_var, str(tmp_path / "run"))
    monkeypatch.delenv("FULL", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend
    nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    private = [m.group(0) for cell in code for m in PRIVATE.finditer(cell.source)]
    assert not private, f"{name}: private names {private}; promote them to public API"
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    outputs = [o for cell in code for o in cell.get("outputs", [])]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    assert os.listdir(tmp_path / "run"), f"{name} wrote nothing to ${out_var}"
    plotting = [cell for cell in code if "plt.show()" in cell.source]
    assert len(plotting) >= 2
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == cell.source.count("plt.show()"), cell.source[:200]
