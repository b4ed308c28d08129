import numpy as np
import pytest

from pertoken.errors import PertokenError
from pertoken.pipeline.projection import cosine, project, project_rows


def test_project_and_cosine_match_the_formula():
    h = np.array([3.0, 4.0, 0.0], np.float32)
    v = np.array([2.0, 0.0, 0.0], np.float32)
    assert project(h, v) == pytest.approx(3.0)  # h . v / |v| = 6 / 2
    assert cosine(h, v) == pytest.approx(0.6)  # 6 / (5 * 2)
    assert project(h, -v) == pytest.approx(-3.0)


def test_projection_does_not_depend_on_the_vector_length():
    rng = np.random.default_rng(0)
    h, v = rng.normal(size=(5, 8)), rng.normal(size=8)
    np.testing.assert_allclose(project(h, v), project(h, 7.5 * v))
    np.testing.assert_allclose(cosine(h, v), cosine(3 * h, v))


def test_cosine_of_a_zero_state_is_zero_and_a_zero_vector_is_an_error():
    assert cosine(np.zeros(4), np.ones(4)) == 0.0
    with pytest.raises(PertokenError, match="all zeros"):
        project(np.ones(4), np.zeros(4))


def test_project_rows_is_every_token_vector_layer_pair():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(6, 2, 8)).astype(np.float32)  # [T, L, hidden]
    dirs = rng.normal(size=(3, 2, 8)).astype(np.float32)  # [K, L, hidden]
    proj, cos = project_rows(hidden, dirs)
    assert proj.shape == cos.shape == (6, 3, 2)
    for t, k, layer in [(0, 0, 0), (5, 2, 1), (3, 1, 0)]:
        h, v = hidden[t, layer].astype(np.float64), dirs[k, layer].astype(np.float64)
        assert proj[t, k, layer] == pytest.approx(h @ v / np.linalg.norm(v))
        assert cos[t, k, layer] == pytest.approx(h @ v / np.linalg.norm(h) / np.linalg.norm(v))
