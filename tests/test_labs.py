"""The notebook runner's clean-up of executed notebooks."""

from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_notebook, new_output

from labkit.labs import find_notebooks, strip_metadata


def test_strip_metadata_keeps_content_and_tags_and_drops_run_state():
    cell = new_code_cell(
        "print(1)",
        metadata={"tags": ["keep"], "execution": {"shell.execute_reply": "2026-11-26T07:00:00Z"}},
    )
    cell.outputs = [
        new_output("stream", name="stdout", text="1\n"),
        new_output(
            "display_data",
            data={
                "text/plain": "  0%|  | 0/10",
                "application/vnd.jupyter.widget-view+json": {"model_id": "x"},
            },
        ),
        new_output(
            "execute_result", data={"text/plain": "2"}, metadata={"x": 1}, execution_count=1
        ),
    ]
    nb = new_notebook(
        cells=[cell], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}}
    )
    strip_metadata(nb)
    # One fixed kernelspec (the venv's "Python (labkit)" kernel), whatever the run used.
    assert nb.metadata["kernelspec"] == {
        "display_name": "Python (labkit)",
        "language": "python",
        "name": "labkit",
    }
    assert set(nb.metadata) == {"kernelspec", "language_info"}
    assert nb.metadata["language_info"]["name"] == "python"
    assert nb.cells[0].metadata == {"tags": ["keep"]}
    outs = nb.cells[0].outputs
    assert [o.output_type for o in outs] == ["stream", "execute_result"]
    assert outs[1].metadata == {} and outs[1].data == {"text/plain": "2"}
    nbformat.validate(nb)


def test_the_four_labs_are_found_in_order():
    names = [p.name for p in find_notebooks()]
    assert names == sorted(names) and len(names) == 4
    assert names[0].startswith("01_") and names[-1].startswith("04_")
