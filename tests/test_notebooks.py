"""The notebooks in `colab/` run top to bottom in a fresh Jupyter kernel (nbclient), on their
smoke presets, and a person watching sees the distillation's progress bar."""

import glob
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  # The kernel inherits this environment: fresh run folders, the CPU, the checkout importable.
  monkeypatch.setenv("DISTILL_JAX_RUNS", str(tmp_path / "runs"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", ROOT)
  # LLVM -O0 compiles several times faster; the notebooks' figures are not what is tested.
  monkeypatch.setenv("XLA_FLAGS",
                     f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0")
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    assert cell.cell_type != "code" or not cell.get("outputs"), (
        f"{path} holds outputs; strip them before committing")
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  # The progress bar: a tqdm widget where ipywidgets is installed (Colab), else tqdm's text bar.
  bars = [o for o in outputs
          if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
          or (o.output_type == "stream" and "step/s" in o.get("text", "")
              and "%|" in o.get("text", ""))]
  if "pipeline.distill_and_evaluate" in "".join(c.source for c in notebook.cells):
    assert bars, [o.get("text", "")[:200] for o in outputs if o.output_type == "stream"]
