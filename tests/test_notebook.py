"""The example notebook runs top to bottom (in a fast mode) and draws its figure."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).parents[1] / "examples" / "kfac_clipping.ipynb"


def test_notebook_executes(monkeypatch):
    monkeypatch.setenv("KFAC_NOTEBOOK_STEPS", "12")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline figure"
    text = "".join(o.get("text", "") for o in outputs)
    assert "Newton-step clip" in text and "final loss" in text
    assert os.environ.get("KFAC_NOTEBOOK_STEPS") == "12"
