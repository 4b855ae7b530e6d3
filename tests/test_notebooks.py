"""The notebooks are committed executed, so a reader browsing notebooks/ sees their plots: outputs present,
cells run in order, no errors, and small enough to browse.

(nbmake, configured in pyproject.toml, runs every notebook again as a test of its own.)"""

import base64
import re

import nbformat
import pytest

from helpers import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
MAX_BYTES = 1_500_000  # per notebook, images included
MAX_IMAGE_BYTES = 250_000


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed_in_order_without_errors_and_small(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: run it top to bottom in a fresh kernel, then commit"
    assert any(cell.outputs for cell in code), f"{path.name}: committed without outputs"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    assert not any(o.get("name") == "stderr" and "Traceback" in o.get("text", "") for c in code for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), f"{path.name}: no plot"
    for cell in code:
        for output in cell.outputs:
            png = output.get("data", {}).get("image/png")
            if png:
                assert len(base64.b64decode(png)) <= MAX_IMAGE_BYTES, f"{path.name}: an image is too large to browse"
    assert path.stat().st_size <= MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes: shrink its outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shows_no_path_of_the_machine_it_ran_on_and_names_no_shared_folder(path):
    """Outputs say "$BN_LIGHTNING_DATA" or "data/", not this machine's folders; the data is found by the one rule."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in code:
        assert "shared" not in cell.source, f"{path.name}: code names a shared folder; use resolve_data_dir"
        for output in cell.outputs:
            text = output.get("text", "") + output.get("data", {}).get("text/plain", "")
            found = re.search(r"(^|[\s'\"(=])/[\w.-]+/[\w.-]+/", text)
            assert not found, f"{path.name}: an output shows an absolute path: {text[found.start():found.end() + 40]!r}"
