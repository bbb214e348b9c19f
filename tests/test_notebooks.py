"""Every tutorial notebook in notebooks/ executes without an error (nbclient, a fresh kernel each).

The notebooks run on the model named by ``KALM_RAG_MODEL`` (default: the embedded kalm-mini); this test
does not set it, so CI runs them on kalm-mini. Each notebook writes its stores, BEIR files and YAML into a
temporary folder of its own (``WORK``); the test runs it from an empty working directory and checks that
it is still empty afterwards, so running a notebook by hand leaves nothing in the repository. Offline: the
kernel inherits ``HF_HUB_OFFLINE=1``, Haystack's telemetry switched off and ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_are_present():
    names = [p.name for p in NOTEBOOKS]
    assert len(names) == 6, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_cleared(path: Path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # the kernel is a child process: it inherits this environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
    # one torch thread: CI machines are shared, and oversubscribed OpenMP threads are many times slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not left, f"{path.name} wrote {left} into its working directory"
