"""Robust z-scores: one implementation (core.intensity) for the QC's morphology outliers and the group report."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

import nuclei_app
from nuclei_app.core.intensity import MAD_TO_SD, MEAN_AD_TO_SD, robust_reference, robust_z, robust_z_scores
from nuclei_app.qc.metrics import MORPHOLOGY_SPREAD_FLOOR, morphology_outliers


def test_spread_is_1_4826_mad():
    median, spread = robust_reference(np.asarray([1.0, 2.0, 3.0, np.nan, np.inf]))
    assert (median, spread) == (2.0, pytest.approx(1.4826))
    np.testing.assert_allclose(robust_z_scores([1.0, 2.0, 3.0, np.nan]), [-1 / 1.4826, 0.0, 1 / 1.4826, np.nan])


def test_a_mad_of_zero_falls_back_to_the_mean_absolute_deviation():
    values = np.asarray([1.0, 1.0, 1.0, 5.0])  # MAD = 0, mean absolute deviation = 1
    assert robust_reference(values) == (1.0, pytest.approx(MEAN_AD_TO_SD * 1.0))
    z = robust_z_scores(values)
    assert z[:3].tolist() == [0.0, 0.0, 0.0] and z[3] == pytest.approx(4 / 1.2533)
    assert np.isfinite(z).all()
    # With a floor, the larger of the two wins.
    assert robust_reference(values, floor=2.0) == (1.0, 2.0)
    assert robust_reference(values, floor=0.5)[1] == pytest.approx(1.2533)


def test_all_equal_values_have_zero_spread_and_zero_z():
    assert robust_reference([2.0, 2.0, 2.0]) == (2.0, 0.0)
    assert robust_z_scores([2.0, 2.0, np.nan]).tolist()[:2] == [0.0, 0.0]
    # Against a zero-spread reference, another value is infinitely far.
    assert robust_z([2.0, 3.0, 1.0], 2.0, 0.0).tolist() == [0.0, math.inf, -math.inf]


def test_no_finite_value_gives_no_reference():
    median, spread = robust_reference([np.nan, np.inf])
    assert math.isnan(median) and math.isnan(spread)
    assert np.isnan(robust_z_scores([np.nan, np.nan])).all()
    assert np.isnan(robust_z([1.0], median, spread)).all()


def test_morphology_outliers_with_a_mad_of_zero():
    # Most nuclei digitally convex (solidity exactly 1), so the solidity MAD is 0.
    solidity = np.asarray([1.0] * 14 + [0.97, 0.96, 0.95, 0.94, 0.93, 0.6])
    n = solidity.size
    area = np.linspace(280, 320, n)
    eccentricity = np.linspace(0.4, 0.6, n)
    flags, reference = morphology_outliers(area, solidity, eccentricity, k=3.5)
    mean_ad = float(np.mean(np.abs(solidity - 1.0)))
    assert reference["solidity_spread"] == pytest.approx(max(MEAN_AD_TO_SD * mean_ad, MORPHOLOGY_SPREAD_FLOOR["solidity"]))
    assert np.flatnonzero(flags["solidity"]).tolist() == [n - 1]  # the ragged one, not the slightly less convex


def test_the_robust_scale_constants_live_only_in_core_intensity():
    package = Path(nuclei_app.__file__).parent
    owners = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in (MAD_TO_SD, MEAN_AD_TO_SD):
                owners.add(path.relative_to(package).as_posix())
    assert owners == {"core/intensity.py"}
