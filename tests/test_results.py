"""Results record where they came from."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest
from PIL import Image

from labkit import results


@pytest.fixture
def results_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    return tmp_path


SOURCE = {"provider": "local", "model": "smollm2-135m-instruct", "engine": "llama"}


def test_saved_csv_reads_back_with_its_provenance(results_in_tmp):
    df = pd.DataFrame({"prompt": ["a", "b"], "ttft_ms": [1.5, 2.5]})
    path = results.save_table(df, "lab9_demo", source=SOURCE)
    assert pd.read_csv(path, comment="#").equals(df)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    keys = {line[2:].split(":", 1)[0] for line in header}
    assert {
        "provider",
        "model",
        "engine",
        "machine",
        "labkit",
        "anthropic",
        "openai",
        "date",
    } <= keys


def test_saved_figure_carries_provenance_in_png_text(results_in_tmp):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    path = results.save_figure(fig, "lab9_plot", source=SOURCE)
    text = Image.open(path).text
    assert "smollm2-135m-instruct" in text["Source"]
    assert "machine=" in text["Description"]
    assert len(fig.texts) == 0, "the provenance footer must not stay on the caller's figure"


def test_summary_gathers_headlines_in_lab_order(results_in_tmp):
    results.write_headline("lab2", "Lab 2 — context", pd.DataFrame({"x": [2]}), source=SOURCE)
    results.write_headline(
        "lab1", "Lab 1 — TTFT", pd.DataFrame({"x": [1]}), source=SOURCE, notes="n1"
    )
    text = results.gather_summary().read_text()
    assert text.index("Lab 1 — TTFT") < text.index("Lab 2 — context")
    assert "engine: llama" in text and "n1" in text


def test_quick_reads_the_environment(monkeypatch):
    monkeypatch.setenv("LABKIT_QUICK", "1")
    assert results.quick()
    monkeypatch.setenv("LABKIT_QUICK", "0")
    assert not results.quick()


@pytest.mark.parametrize("layout", ["plain", "two_panels_twin_axis_legend_below"])
def test_provenance_footer_never_overlaps_a_label(results_in_tmp, monkeypatch, layout):
    """The footer is placed under every artist's bounding box, however low the labels sit."""
    fig, axes = plt.subplots(1, 2 if layout != "plain" else 1, figsize=(6, 3), squeeze=False)
    for ax in axes[0]:
        ax.plot([1, 2], [3, 4], label="line")
        ax.set_xlabel("a long x label\nover two lines")
    if layout != "plain":
        axes[0][0].twinx().set_ylabel("right label")
        fig.legend(loc="lower center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    fig.suptitle("title")
    seen = {}
    real_savefig = fig.savefig

    def savefig(*args, **kwargs):
        renderer = fig.canvas.get_renderer()
        footer = fig.texts[-1]
        seen["footer"] = footer.get_window_extent(renderer)
        seen["others"] = [
            a.get_tightbbox(renderer) for a in (*fig.axes, *fig.legends, fig._suptitle)
        ]
        return real_savefig(*args, **kwargs)

    monkeypatch.setattr(fig, "savefig", savefig)
    results.save_figure(fig, "lab9_layout", source=SOURCE)
    for box in seen["others"]:
        assert not seen["footer"].overlaps(box), (seen["footer"], box)
        assert seen["footer"].y1 <= box.y0 + 1e-6
