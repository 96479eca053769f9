"""The knockouts computed in one loop over the batches (shared geometry, input block and last-layer
features) are exactly the predictions of one hooked pass per knockout (analysis/scoring/knockout.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.scoring.features import analysis_blocks
from analysis.scoring.knockout import WHERE, knockout_predictions, predictions, zeroed
from study.config.trial import TrialConfig
from study.data.qm9 import CollatedSplit, QM9Dataset
from study.data.reference import TargetReference
from study.nn.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_loop_gives_every_hooked_pass_exactly(qm9, dtype):
    config = TrialConfig(l_values=[0, 1, 2], hidden_dim=4, num_layers=2, dtype=dtype)
    torch.manual_seed(0)
    model = build_model(config)
    # Untrained weights are small: scale them so every block moves the prediction.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    split = CollatedSplit(QM9Dataset(qm9, np.arange(300), edges=config.edges, cutoff=config.cutoff))  # 3 batches of 128
    reference = TargetReference.mean(-76.0, 10.0)
    units = analysis_blocks(model.layout)

    baseline, knocked = knockout_predictions(model, split, reference, torch_dtype, units)

    assert np.array_equal(baseline, predictions(model, split, reference, torch_dtype))
    assert set(knocked) == {(unit.name, where) for unit in units for where in WHERE}
    for unit in units:
        for where in WHERE:
            with zeroed(model, unit.members, where):
                hooked = predictions(model, split, reference, torch_dtype)
            assert np.array_equal(knocked[(unit.name, where)], hooked), (unit.name, where)
    # The knockouts do something: zeroing l1 in every layer changes the predictions, in the readout's input it cannot.
    assert not np.array_equal(knocked[("l1", "all")], baseline)
    assert np.array_equal(knocked[("l1", "last")], baseline)
