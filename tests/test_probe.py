"""The probe direction: found where a mean difference is misled, scaled like one."""

import numpy as np

from pertoken.pipeline.probe import probe_row, probe_vectors


def _classes(n=200, hidden=32, seed=0):
    """Labels and [n, hidden] states: the trait along dim 0, a huge noisy dim 1 whose class
    means differ by chance-sized amounts that swamp the mean difference."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    x = rng.normal(size=(n, hidden))
    x[:, 0] += 1.5 * (2 * y - 1)  # the trait: well separated, unit noise
    x[:, 1] = 300 * rng.normal(size=n) + 40 * (2 * y - 1)  # massive, barely separating
    return x, y


def test_probe_finds_the_separating_dimension_a_mean_difference_misses():
    x, y = _classes()
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    v = probe_row(x, y)
    unit = v / np.linalg.norm(v)
    assert abs(diff[1]) / np.linalg.norm(diff) > 0.9  # the mean difference follows dim 1
    assert diff[0] / np.linalg.norm(diff) < 0.2
    assert unit[0] > 0.8  # the probe follows the trait
    # scaled to the mean difference's projection on its own direction
    np.testing.assert_allclose(diff @ unit, np.linalg.norm(v), rtol=1e-6)
    # and it separates: positives project above negatives
    proj = x @ unit
    assert proj[y == 1].mean() > proj[y == 0].mean()


def test_identical_sides_give_a_zero_row_and_rows_are_fitted_apart():
    x, y = _classes(n=40, hidden=8)
    same = np.concatenate([x[:20], x[:20]])  # the negatives are copies of the positives
    assert not np.any(probe_row(same, y))
    states = np.stack([same, x], axis=1)  # [N, 2 rows, hidden]
    v = probe_vectors(states.astype(np.float16), y)
    assert v.shape == (2, 8) and v.dtype == np.float32
    assert not np.any(v[0]) and v[1, 0] > 0
