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
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    assert "rel L2 error" in completed.stdout


NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.ipynb"))


def execute(notebook):
    """The notebook's outputs after running every cell (an error in a cell raises here)."""
    import nbclient  # from the test extra
    import nbformat

    document = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(document, timeout=600, kernel_name="python3").execute()
    return [output for cell in document.cells for output in cell.get("outputs", [])]


def test_there_are_notebooks():
    assert {path.name for path in NOTEBOOKS} >= {"getting_started.ipynb", "device_juggling.ipynb"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(notebook):
    # The notebooks assert their results against the reference; any failing cell fails here.
    outputs = execute(notebook)
    assert not [output for output in outputs if output.get("output_type") == "error"]


def test_device_juggling_runs_without_opencl(monkeypatch):
    """On a machine without OpenCL the scheduler has the CPU alone, and the notebook says so (the kernel
    inherits SPARKLE_OPENCL=0, which turns OpenCL off)."""
    monkeypatch.setenv("SPARKLE_OPENCL", "0")
    notebook = next(path for path in NOTEBOOKS if path.name == "device_juggling.ipynb")
    text = "".join(output.get("text", "") for output in execute(notebook) if output.get("output_type") == "stream")
    assert "devices here: cpu\n" in text and "only the CPU" in text
