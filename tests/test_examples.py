"""The examples a newcomer runs must work and agree with the reference (they assert it)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES, "examples/ has no scripts"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(script):
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    assert "rel L2 error" in completed.stdout


NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(notebook):
    # The notebooks assert their results against the reference; any failing cell fails here.
    import nbclient  # from the test extra
    import nbformat

    document = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(document, timeout=600, kernel_name="python3").execute()
    outputs = [output for cell in document.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
