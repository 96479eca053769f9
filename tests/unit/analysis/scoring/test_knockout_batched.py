"""The knockouts computed in one loop over the batches (shared geometry, input block and last-layer
features; the ``all`` knockouts as variants of the node features, several at a time)
are the predictions of one hooked pass per knockout (analysis/scoring/knockout.py), up to float
rounding: each variant's products have other shapes, so other summation orders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.scoring import knockout
from analysis.scoring.features import analysis_blocks
from analysis.scoring.knockout import WHERE, knockout_predictions, predictions, zeroed
from study.config.trial import TrialConfig
from study.data.qm9 import CollatedSplit, QM9Dataset
from study.data.reference import TargetReference
from study.nn.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")

# Largest difference allowed, relative to the largest prediction: a few units in the last place
# (float32 eps 1.2e-7, float64 2.2e-16; measured up to 3.4e-7 and
# 1.6e-15 on [0,1,2], [0,1,3] and [0,1,2,3] x 16 models).
RELATIVE_ROUNDING = {"float32": 2e-6, "float64": 1e-13}


def model_that_uses_every_block(config: TrialConfig):
    torch.manual_seed(0)
    model = build_model(config)
    # Untrained weights are small: scale them so every block moves the prediction.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model


@pytest.mark.parametrize("variants_per_pass", [1, 3, 100])  # alone; the 4 variants in 3 + 1; all at once
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_loop_gives_every_hooked_pass(qm9, monkeypatch, dtype, variants_per_pass):
    monkeypatch.setattr(knockout, "FEATURES_PER_PASS", variants_per_pass * 144)  # [0,1,2] x 16: 144 features
    config = TrialConfig(l_values=[0, 1, 2], hidden_dim=16, num_layers=1, dtype=dtype)  # 16x0e: the factored input
    model = model_that_uses_every_block(config)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    split = CollatedSplit(QM9Dataset(qm9, np.arange(200), edges=config.edges, cutoff=config.cutoff))  # 2 batches of 128
    reference = TargetReference.mean(-76.0, 10.0)
    units = analysis_blocks(model.layout)
    assert len(units) == 5  # l0, l1, l2, lgt0, joint: the unmodified model, l1, l2 and lgt0 pass through the blocks

    baseline, knocked = knockout_predictions(model, split, reference, torch_dtype, units)

    unmodified = predictions(model, split, reference, torch_dtype)
    tolerance = RELATIVE_ROUNDING[dtype] * np.abs(unmodified).max()
    np.testing.assert_allclose(baseline, unmodified, rtol=0, atol=tolerance)
    assert set(knocked) == {(unit.name, where) for unit in units for where in WHERE}
    for unit in units:
        for where in WHERE:
            with zeroed(model, unit.members, where):
                hooked = predictions(model, split, reference, torch_dtype)
            np.testing.assert_allclose(knocked[(unit.name, where)], hooked, rtol=0, atol=tolerance, err_msg=f"{unit.name} {where}")
            if unit.name in ("l0", "joint"):
                # These hold every block the readout reads: no pass through the blocks, and no
                # rounding either (both leave the readout exact zeros).
                assert np.array_equal(knocked[(unit.name, where)], hooked), (unit.name, where)
    # The knockouts do something: zeroing l1 in every layer changes the predictions (by far more
    # than the rounding allowed above), in the readout's input it cannot.
    assert np.abs(knocked[("l1", "all")] - baseline).max() > 1000 * tolerance
    assert np.array_equal(knocked[("l1", "last")], baseline)


def test_units_of_the_same_blocks_share_one_variant_and_match_their_hooked_passes(qm9, monkeypatch):
    # [0,1]: lgt0 is the l1 block, so the blocks carry two variants (the unmodified model and l1),
    # not three, and lgt0's knockouts are l1's, each its own hooked pass.
    config = TrialConfig(l_values=[0, 1], hidden_dim=8, num_layers=1, dtype="float64")
    model = model_that_uses_every_block(config)
    split = CollatedSplit(QM9Dataset(qm9, np.arange(100), edges=config.edges, cutoff=config.cutoff))
    reference = TargetReference.mean(-76.0, 10.0)
    units = analysis_blocks(model.layout)
    assert [unit.name for unit in units] == ["l0", "l1", "lgt0", "joint"]
    passed = []
    real = knockout._zeroed_per_variant
    monkeypatch.setattr(
        knockout, "_zeroed_per_variant", lambda features, knocked_out: passed.append(len(knocked_out)) or real(features, knocked_out)
    )

    _, knocked = knockout_predictions(model, split, reference, torch.float64, units)

    assert set(passed) == {2}  # every zeroing in the one pass saw two variants
    unmodified = predictions(model, split, reference, torch.float64)
    tolerance = RELATIVE_ROUNDING["float64"] * np.abs(unmodified).max()
    for where in WHERE:
        assert np.array_equal(knocked[("lgt0", where)], knocked[("l1", where)])
        with zeroed(model, units[2].members, where):
            hooked = predictions(model, split, reference, torch.float64)
        np.testing.assert_allclose(knocked[("lgt0", where)], hooked, rtol=0, atol=tolerance, err_msg=where)
