"""The provider matrix: the notebooks' paid-provider branches, executed.

A key-holder runs the notebooks with ``LABKIT_PROVIDER=anthropic`` or ``openai``; those
code paths (``API == "openai"``, Claude for the forced tool call, cells that skip
without the local engine...) never run on the offline default. Here each provider is
aimed by base URL at labkit's local API on the real model (``ANTHROPIC_BASE_URL`` /
``OPENAI_BASE_URL``, as the SDKs honour them) and the notebooks run top to bottom in
quick mode, their outputs discarded (the committed notebooks are left as they are).

CI budget: ``make test`` runs notebook 01 for each provider (it has the most provider
branches: the SDK switch, the tool call, the sim fault demos), about 2.5 minutes each
here. ``make matrix`` (``LABKIT_MATRIX=all``) runs all four notebooks for both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: What ``make test`` runs (the docstring says why); ``LABKIT_MATRIX=all`` runs every notebook.
CI_SUBSET = {("anthropic", "01_streaming_ttft.ipynb"), ("openai", "01_streaming_ttft.ipynb")}


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.matrix
@pytest.mark.parametrize("notebook", NOTEBOOKS)
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_notebook_runs_as_a_key_holder_would(provider, notebook, llama_api, monkeypatch, tmp_path):
    if os.environ.get("LABKIT_MATRIX") != "all" and (provider, notebook) not in CI_SUBSET:
        pytest.skip("outside make test's budget: run `make matrix` (LABKIT_MATRIX=all)")
    import nbformat
    from nbclient import NotebookClient

    from labkit.labs import _kernel_name

    for key in [k for k in os.environ if k.startswith(("LABKIT_", "ANTHROPIC_", "OPENAI_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LABKIT_PROVIDER", provider)
    monkeypatch.setenv("LABKIT_QUICK", "1")
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("ANTHROPIC_BASE_URL", llama_api.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "labkit-local")
    monkeypatch.setenv("OPENAI_BASE_URL", llama_api.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "labkit-local")
    path = ROOT / "notebooks" / notebook
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=900,
        kernel_name=_kernel_name(),
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # a failing cell raises CellExecutionError with the cell and traceback
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert errors == []
