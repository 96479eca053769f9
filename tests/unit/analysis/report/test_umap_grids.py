"""The report's UMAP grids drawn in a process of their own are the grids drawn in this one."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.report.umap_grids import UmapDrawing, UmapGrid


def grids(folder, n=2):
    rng = np.random.default_rng(0)
    folder.mkdir()
    return [
        UmapGrid(
            name=f"umap_{i:03d}_l_0_1",
            title=f"l=0,1 seed {i} (run {i})",
            projections={"l0": rng.normal(size=(50, 2)), "l1": rng.normal(size=(50, 2))},
            nsps=rng.uniform(0, 1, 50),
            abs_error_meV=rng.exponential(30, 50),
            path=folder / f"umap_{i:03d}_l_0_1.png",
        )
        for i in range(1, n + 1)
    ]


def test_grids_drawn_in_the_background_are_byte_for_byte_the_ones_drawn_here(tmp_path):
    here, there = grids(tmp_path / "here"), grids(tmp_path / "there")
    with UmapDrawing(here, in_background=False) as drawing:
        drawn_here = drawing.figures()
    with UmapDrawing(there, in_background=True) as drawing:
        drawn_there = drawing.figures()
    assert list(drawn_here) == list(drawn_there) == [grid.name for grid in here]
    for name in drawn_here:
        (path_here, caption_here), (path_there, caption_there) = drawn_here[name], drawn_there[name]
        assert path_there.parent == tmp_path / "there" and caption_here == caption_there
        assert path_here.read_bytes() == path_there.read_bytes()


def test_a_grid_that_fails_in_the_background_fails_the_analysis(tmp_path):
    [grid] = grids(tmp_path / "fails", n=1)
    broken = UmapGrid(grid.name, grid.title, grid.projections, grid.nsps, grid.abs_error_meV, tmp_path / "missing" / "umap.png")
    with UmapDrawing([broken], in_background=True) as drawing, pytest.raises(FileNotFoundError):
        drawing.figures()
