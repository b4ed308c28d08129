"""Ablating and capping a real trait vector lower the trait, on the tiny model trained with one
(tests/semantic_model.py), judged by phrase bank. The figures: benchmarks/steer_operators.py."""

import pytest

from benchmarks.steer_operators import scores
from pertoken.backends import load_backend
from tests import semantic_model as sm

pytestmark = pytest.mark.slow

ROW = 3  # the report card's suggested row on this model (tests/test_semantic_vet.py)


def test_ablate_and_cap_each_lower_the_trait_under_its_system_prompt(torch_one_thread):
    backend = load_backend(str(sm.semantic_model_dir()), "torch", dtype="float32", device="cpu")
    got = scores(backend, ROW, samples=2)
    none = got["none"][0]
    ablate = got["ablate"][0]
    (cap,) = [trait for name, (trait, _) in got.items() if name.startswith("cap")]
    assert none > 60, got  # the system prompt makes the trait
    # one direction at one row carries part of the trait: the drop is a few points (seeded)
    assert ablate < none, got
    assert cap < none, got
