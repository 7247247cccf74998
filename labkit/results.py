"""Writing lab results with their provenance.

Every file a lab writes under ``results/`` says where it came from — provider,
model, engine, machine (CPU model and cores), labkit and SDK versions, date — so an
instructor can compare a run on their own key or machine with the committed one.

Notes:

1. CSV files carry provenance as leading ``# key: value`` lines; read them back
   with ``pd.read_csv(path, comment="#")``.
2. PNG files carry it as PNG text chunks (``Source``, ``Description``) and as a
   one-line footer drawn on the figure, so it survives being pasted elsewhere.
3. Each lab's headline table goes to ``results/<lab>_headline.md``;
   :func:`gather_summary` joins them into ``results/SUMMARY.md`` in lab order.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = [
    "gather_summary",
    "project_root",
    "provenance",
    "quick",
    "results_dir",
    "save_figure",
    "save_table",
    "write_headline",
]

_PACKAGES = ("labkit", "anthropic", "openai", "llama-cpp-python", "tiktoken")


def quick() -> bool:
    """True when ``LABKIT_QUICK=1``: labs shrink trials and turns (CI uses it)."""
    return os.environ.get("LABKIT_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}


def project_root() -> Path:
    """The labkit checkout: the nearest folder at or above the working directory that
    holds ``pyproject.toml`` (notebooks run with ``notebooks/`` as their cwd)."""
    here = Path.cwd().resolve()
    return next((p for p in (here, *here.parents) if (p / "pyproject.toml").exists()), here)


def results_dir() -> Path:
    """``$LABKIT_RESULTS_DIR``, else ``results/`` at the top of the labkit checkout."""
    env = os.environ.get("LABKIT_RESULTS_DIR")
    path = Path(env) if env else project_root() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def provenance(source: dict[str, Any] | None = None) -> dict[str, str]:
    """Where a result came from: ``source`` (provider, model, engine…) plus machine and versions.

    ``source`` is typically ``labkit.providers.client().describe()``.
    """
    info: dict[str, str] = {}
    for key, value in (source or {}).items():
        if value is not None:
            info[str(key)] = str(value)
    info.setdefault("provider", os.environ.get("LABKIT_PROVIDER", "local"))
    info["machine"] = (
        f"{_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
    )
    info["python"] = platform.python_version()
    for pkg in _PACKAGES:
        info[pkg] = _version(pkg)
    info["quick"] = "yes" if quick() else "no"
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return info


def _provenance_line(info: dict[str, str]) -> str:
    keys = ("provider", "model", "engine", "machine", "labkit", "date")
    return " · ".join(f"{k}: {info[k]}" for k in keys if k in info)


def save_table(df: Any, name: str, *, source: dict[str, Any] | None = None) -> Path:
    """Write ``df`` to ``results/<name>.csv`` with provenance comment lines; return the path."""
    path = results_dir() / f"{name}.csv"
    info = provenance(source)
    with path.open("w", newline="") as fh:
        for key, value in info.items():
            fh.write(f"# {key}: {value}\n")
        df.to_csv(fh, index=False)
    return path


def save_figure(fig: Any, name: str, *, source: dict[str, Any] | None = None) -> Path:
    """Save a matplotlib figure to ``results/<name>.png`` with provenance; return the path."""
    path = results_dir() / f"{name}.png"
    info = provenance(source)
    line = _provenance_line(info)
    footer = _add_footer(fig, line)
    try:
        fig.savefig(
            path,
            dpi=110,
            bbox_inches="tight",
            metadata={
                "Source": line,
                "Description": "; ".join(f"{k}={v}" for k, v in info.items()),
            },
        )
    finally:
        footer.remove()
    return path


def _add_footer(fig: Any, line: str) -> Any:
    """Draw ``line`` under everything already on ``fig`` (axes, tick labels, axis labels,
    legends, titles), so it can never overprint a label; ``bbox_inches="tight"`` then grows
    the saved image to include it."""
    renderer = fig.canvas.get_renderer()
    bbox = fig.get_tightbbox(renderer)  # inches, every artist included
    height = fig.get_figheight()
    y = bbox.y0 / height - 0.02  # a small gap below the lowest artist
    x = max(bbox.x0 / fig.get_figwidth(), 0.0)
    return fig.text(x, y, line, fontsize=6, color="0.45", ha="left", va="top")


def write_headline(
    lab: str, title: str, df: Any, *, source: dict[str, Any] | None = None, notes: str = ""
) -> Path:
    """Write a lab's headline table (Markdown) for ``results/SUMMARY.md``; return its path."""
    info = provenance(source)
    body = [f"## {title}", ""]
    body += [f"- {k}: {v}" for k, v in info.items()]
    body += ["", df.to_markdown(index=False) if hasattr(df, "to_markdown") else str(df), ""]
    if notes:
        body += [notes.strip(), ""]
    path = results_dir() / f"{lab}_headline.md"
    path.write_text("\n".join(body))
    return path


def gather_summary(directory: Path | None = None) -> Path:
    """Join every ``*_headline.md`` into ``SUMMARY.md`` (sorted by lab name); return its path."""
    directory = directory or results_dir()
    parts = [
        "# labkit results",
        "",
        "Regenerated by `make labs`; do not edit by hand. Each section records the provider,",
        "model, engine, machine and versions it was measured with.",
        "",
    ]
    headlines = sorted(directory.glob("*_headline.md"))
    if not headlines:
        parts.append("No lab has written a headline table yet: run `make labs`.")
    for path in headlines:
        parts += [path.read_text().strip(), ""]
    out = directory / "SUMMARY.md"
    out.write_text("\n".join(parts) + "\n")
    return out
