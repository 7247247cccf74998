"""Run the lab notebooks top to bottom, as `make labs` does.

Notes:

1. Each notebook runs in a fresh kernel with ``notebooks/`` as its working
   directory, in file-name order, and stops the run at the first failing cell
   (the error and the cell are printed; the notebook on disk is left as it was).
2. Outputs are saved in place; text printed piece by piece (a streamed reply) is
   joined into one output, and notebook and cell metadata that change from run to
   run (timings, widget state, kernel details) are stripped so diffs show content.
   The notebook keeps one fixed ``kernelspec``: the "Python (labkit)" kernel that
   ``make install`` registers in the venv, so JupyterLab opens a fresh clone on the
   right kernel without asking and without marking the notebook modified.
3. After the notebooks, ``results/SUMMARY.md`` is regenerated from each lab's
   headline table (see :mod:`labkit.results`).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from .errors import LabkitError
from .results import gather_summary, project_root

__all__ = ["find_notebooks", "run_labs", "run_notebook", "strip_metadata"]

_KEEP_CELL_METADATA = {"tags"}

#: The kernel ``make install`` registers in the venv (``ipykernel install --sys-prefix``).
KERNEL_NAME = "labkit"
KERNELSPEC = {"display_name": "Python (labkit)", "language": "python", "name": KERNEL_NAME}
_LANGUAGE_INFO = {
    "codemirror_mode": {"name": "ipython", "version": 3},
    "file_extension": ".py",
    "mimetype": "text/x-python",
    "name": "python",
    "nbconvert_exporter": "python",
    "pygments_lexer": "ipython3",
    "version": platform.python_version(),
}


def find_notebooks(root: Path | None = None) -> list[Path]:
    """The lab notebooks in order: ``notebooks/NN_*.ipynb``."""
    root = root or project_root()
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def strip_metadata(nb: dict | object) -> None:
    """Remove run-specific metadata in place (cell timings, widget state, kernel info).

    Widget outputs (tqdm bars, the chat widget) are dropped too: without the widget
    state they cannot render, and their text fallback ("0%|") would misreport them.
    """
    language = nb.metadata.get("language_info") or {}  # type: ignore[attr-defined]
    nb.metadata = {  # type: ignore[attr-defined]
        "kernelspec": dict(KERNELSPEC),
        # What the kernel reports, as JupyterLab would write it on opening (else it marks
        # the notebook modified); the Python version is the venv's.
        "language_info": {**_LANGUAGE_INFO, **language, "name": "python"},
    }
    for cell in nb.cells:  # type: ignore[attr-defined]
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in _KEEP_CELL_METADATA}
        if cell.get("cell_type") == "code":
            cell["outputs"] = [
                o for o in cell.get("outputs", []) if _WIDGET_VIEW not in o.get("data", {})
            ]
            for output in cell["outputs"]:
                if "metadata" in output:
                    output["metadata"] = {}


def _kernel_name() -> str:
    """The labkit kernel when registered (``make install`` does), else this Python's own."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def run_notebook(path: Path, *, timeout: int = 1800) -> float:
    """Execute one notebook in place; return the seconds it took."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=_kernel_name(),
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        raise LabkitError(
            f"{path.name} failed:\n{exc}",
            hint=f"Open {path} in Jupyter and run it to see the failing cell in context.",
        ) from None
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})  # one output per printed block
    strip_metadata(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def run_labs(notebooks: list[str] | None = None, *, quick: bool = False) -> Path:
    """Run notebooks (default: all) and regenerate ``results/SUMMARY.md``; return its path."""
    from rich.console import Console

    console = Console()
    if quick:
        os.environ["LABKIT_QUICK"] = "1"
    paths = [Path(p) for p in notebooks] if notebooks else find_notebooks()
    if not paths:
        raise LabkitError("No notebooks found.", hint="Run `make labs` from the labkit checkout.")
    for i, path in enumerate(paths, 1):
        if not path.exists():
            raise LabkitError(
                f"No notebook at {path}.", hint="Pass paths like notebooks/01_streaming_ttft.ipynb."
            )
        with console.status(f"[{i}/{len(paths)}] running {path.name}…"):
            seconds = run_notebook(path)
        console.print(f"[green]✓[/] [{i}/{len(paths)}] {path.name} ({seconds:.0f} s)")
    summary = gather_summary()
    console.print(f"Results in {summary.parent}/ — summary: {summary}")
    return summary
