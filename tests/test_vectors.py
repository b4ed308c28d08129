"""PersonaVector arithmetic, and the invariances it must keep through a real backend."""

import numpy as np
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.errors import PertokenError
from pertoken.vectors import PersonaVector
from tests.reference import chat_prompts


def vec(seed, shape=(5, 64), meta=None) -> PersonaVector:
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return PersonaVector(data, dict(meta or {}))


def test_arithmetic_is_elementwise_on_new_float32_vectors():
    a, b = vec(0, meta={"trait": "evil"}), vec(1)
    before = a.data.copy()
    cases = {
        "a + b": (a + b, a.data + b.data),
        "a - b": (a - b, a.data - b.data),
        "2 * a": (2 * a, 2 * a.data),
        "a * 2": (a * 2, 2 * a.data),
        "np.float32(-1.5) * a": (np.float32(-1.5) * a, -1.5 * a.data),
        "a / 4": (a / 4, a.data / 4),
        "-a": (-a, -a.data),
    }
    for name, (got, want) in cases.items():
        assert isinstance(got, PersonaVector) and got.data.dtype == np.float32, name
        np.testing.assert_allclose(got.data, want, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(a.data, before)  # operands are never changed
    np.testing.assert_array_equal((a - a).data, np.zeros_like(a.data))


def test_meta_keeps_what_both_sides_agree_on():
    a = vec(0, meta={"model": "m", "trait": "evil", "kind": "response_avg"})
    b = vec(1, meta={"model": "m", "trait": "kind", "kind": "response_avg"})
    assert (a - b).meta == {"model": "m", "kind": "response_avg"}
    scaled = 3 * a
    assert scaled.meta == a.meta and scaled.meta is not a.meta


def test_bad_operands_are_clear_errors():
    a = vec(0)
    with pytest.raises(PertokenError, match=r"shapes \[5, 64\] and \[5, 32\]"):
        a + vec(1, (5, 32))
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(ZeroDivisionError):
        a / 0


def test_normalized_rows_are_unit_length_and_zero_rows_stay_zero():
    a = vec(0)
    a.data[0] = 0  # row 0 never extracted
    a.data[3] *= 1e-3
    n = a.normalized()
    norms = np.linalg.norm(n.data, axis=1)
    np.testing.assert_allclose(norms[1:], 1.0, rtol=1e-6)
    assert np.isfinite(n.data).all() and not n.data[0].any()
    cos = (n.data[1:] * a.data[1:]).sum(1) / np.linalg.norm(a.data[1:], axis=1)
    np.testing.assert_allclose(cos, 1.0, rtol=1e-6)  # same directions
    np.testing.assert_allclose(n.normalized().data, n.data, rtol=1e-6)


@pytest.fixture(scope="module", params=["torch", "mlx"])
def backend(request, llama_dir):
    if request.param == "mlx":
        pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pertoken[mlx])")
    return load_backend(str(llama_dir), request.param, dtype="float32", device="cpu")


def test_coef_zero_equals_v_times_zero_equals_v_minus_v_equals_unsteered(backend, torch_one_thread):
    v, L = vec(2), 2
    p = chat_prompts(backend)[1]
    plain = backend.logits(p)
    for steer in (
        Steer.single(L, v.row(L), 0.0),
        Steer.single(L, (v * 0).row(L), 5.0),
        Steer.single(L, (v - v).row(L), 5.0),
        Steer.single(L, (v + -v).row(L), 5.0),
    ):
        np.testing.assert_array_equal(backend.logits(p, steer=steer), plain)
    kw = {"max_new_tokens": 8, "temperature": 0}
    zero = Steer.single(L, (v - v).row(L), 5.0, positions="response")
    assert backend.generate([p], steer=zero, **kw) == backend.generate([p], **kw)
    assert not np.allclose(backend.logits(p, steer=Steer.single(L, v.row(L), 5.0)), plain)


def test_scaling_the_vector_is_scaling_the_coefficient(backend, torch_one_thread):
    v, L = vec(3), 2
    p = chat_prompts(backend)[0]
    want = backend.logits(p, steer=Steer.single(L, v.row(L), 3.0))
    for scaled, coef in ((v * 3, 1.0), (v / 2, 6.0), (v + v + v, 1.0), (-v, -3.0)):
        got = backend.logits(p, steer=Steer.single(L, scaled.row(L), coef))
        np.testing.assert_allclose(got, want, atol=1e-4)
    unit = v.normalized()
    norm = float(np.linalg.norm(v.row(L)))
    got = backend.logits(p, steer=Steer.single(L, unit.row(L), 3.0 * norm))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_constructor_makes_load_vectors_checks():
    for data, msg in [
        (np.ones(128), r"shape \[128\], not \[n_layers\+1, hidden\]"),
        (np.ones((1, 8)), r"shape \[1, 8\]"),
        (np.full((3, 8), np.nan), "24 NaN or infinite values"),
        (np.ones((3, 8)) * 1e39, "NaN or infinite"),  # overflows float32
        (np.ones((3, 8), complex), "complex"),
    ]:
        with pytest.raises(PertokenError, match=msg):
            PersonaVector(data)
    v = PersonaVector(np.ones((3, 8), np.float64))
    assert v.data.dtype == np.float32


def test_arithmetic_that_is_not_finite_is_refused():
    v = PersonaVector(np.ones((3, 8), np.float32))
    for make in (lambda: v * float("nan"), lambda: float("inf") * v, lambda: v / float("nan")):
        with pytest.raises(PertokenError, match="not a finite number"):
            make()
    with pytest.raises(PertokenError, match=r"v \* 1e\+39 overflows float32"):
        v * 1e39
    big = PersonaVector(np.full((3, 8), 3e38, np.float32))
    with pytest.raises(PertokenError, match=r"v \+ w overflows float32"):
        big + big
    np.testing.assert_array_equal((v * 2 - v).data, v.data)
