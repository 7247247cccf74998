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

The Anthropic format has a peer labkit did not write: llama.cpp's ``llama-server`` (the
``llama_server`` fixture; ``make peer`` builds it), the counterpart of
``llama_cpp.server`` in tests/test_interop.py. Notebook 01 runs against it with
``LABKIT_PROVIDER=anthropic`` as a key-holder's would against any compatible server.
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
    errors = _run_notebook(
        notebook, provider, llama_api.base_url, llama_api.openai_base_url, monkeypatch, tmp_path
    )
    assert errors == []


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.matrix
@pytest.mark.timeout(900)  # a whole notebook, like nbval's per-cell limit in make test
def test_notebook_01_runs_on_llama_server_as_the_anthropic_peer(
    llama_server, monkeypatch, tmp_path
):
    """Notebook 01 with LABKIT_PROVIDER=anthropic aimed at llama.cpp's llama-server: the
    SDK helpers it teaches, the trials, a forced tool call the server does not honour
    (the cell says so), all against a server labkit did not write."""
    errors = _run_notebook(
        "01_streaming_ttft.ipynb",
        "anthropic",
        llama_server.base_url,
        llama_server.openai_base_url,
        monkeypatch,
        tmp_path,
        model=llama_server.alias,
    )
    assert errors == []


def _run_notebook(
    notebook: str,
    provider: str,
    anthropic_url: str,
    openai_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    model: str | None = None,
) -> list:
    """Execute ``notebook`` in quick mode as a ``provider`` key-holder would, the SDKs aimed
    at these base URLs; return the error outputs (the committed notebook is left as is)."""
    import nbformat
    from nbclient import NotebookClient

    from labkit.labs import _kernel_name

    for key in [k for k in os.environ if k.startswith(("LABKIT_", "ANTHROPIC_", "OPENAI_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LABKIT_PROVIDER", provider)
    monkeypatch.setenv("LABKIT_QUICK", "1")
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    if model:
        monkeypatch.setenv("LABKIT_MODEL", model)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "labkit-local")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_url)
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
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
