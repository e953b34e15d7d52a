"""KL estimators (hand values, k3 >= 0) and the coefficient controllers (hand-computed update
sequences, clipping, state, validation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.objectives.kl import AdaptiveKLController, FixedKLController, kl_penalty


def test_adaptive_hand_computed_sequence():
    ctrl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert ctrl.value == 0.2
    # 7.2/6 - 1 = 0.2 (at the clip edge); factor 1 + 0.2*1000/10000 = 1.02 -> 0.204
    ctrl.update(7.2, 1000)
    assert ctrl.value == pytest.approx(0.204, rel=1e-12)
    # 3/6 - 1 = -0.5 -> clipped to -0.2; factor 1 - 0.2*500/10000 = 0.99 -> 0.20196
    ctrl.update(3.0, 500)
    assert ctrl.value == pytest.approx(0.20196, rel=1e-12)
    # 6.6/6 - 1 = 0.1 (inside the clip); factor 1 + 0.1*2000/10000 = 1.02 -> 0.2059992
    ctrl.update(6.6, 2000)
    assert ctrl.value == pytest.approx(0.2059992, rel=1e-12)
    # on target: no change
    ctrl.update(6.0, 5000)
    assert ctrl.value == pytest.approx(0.2059992, rel=1e-12)
    # a 0-d tensor KL is accepted; 4.8/6 - 1 = -0.2; factor 1 - 0.2*100/10000 = 0.998
    ctrl.update(torch.tensor(4.8, dtype=torch.float64), 100)
    assert ctrl.value == pytest.approx(0.2055872016, rel=1e-12)


@pytest.mark.parametrize(
    "kl,factor",
    [(1000.0, 1.2), (12.0, 1.2), (0.0, 0.8), (-5.0, 0.8), (6.6, 1.1), (5.4, 0.9)],
)
def test_adaptive_error_is_clipped_to_plus_minus_0_2(kl, factor):
    # n_steps == horizon makes the factor 1 + clipped error
    ctrl = AdaptiveKLController(init_kl_coef=1.0, target=6.0, horizon=10)
    ctrl.update(kl, 10)
    assert ctrl.value == pytest.approx(factor, rel=1e-12)


def test_adaptive_zero_steps_changes_nothing():
    ctrl = AdaptiveKLController(init_kl_coef=0.3)
    ctrl.update(100.0, 0)
    assert ctrl.value == 0.3


def test_fixed_controller_ignores_updates():
    ctrl = FixedKLController(0.05)
    ctrl.update(100.0, 10**6)
    assert ctrl.value == 0.05


def test_state_round_trip_continues_identically():
    a = AdaptiveKLController(init_kl_coef=0.1, target=3.0, horizon=1000)
    a.update(4.0, 64)
    a.update(1.0, 64)
    state = json.loads(json.dumps(a.state_dict()))  # plain, serialisable types
    assert state == {"value": a.value}
    b = AdaptiveKLController(init_kl_coef=0.7, target=3.0, horizon=1000)
    b.load_state_dict(state)
    assert b.value == a.value
    for ctrl in (a, b):
        ctrl.update(5.0, 128)
    assert b.value == a.value != 0.1

    f = FixedKLController(0.2)
    f2 = FixedKLController(0.9)
    f2.load_state_dict(f.state_dict())
    assert f2.value == 0.2


def test_load_state_dict_validates():
    ctrl = AdaptiveKLController()
    with pytest.raises(KeyError, match="value"):
        ctrl.load_state_dict({})
    with pytest.raises(ValueError, match="value"):
        ctrl.load_state_dict({"value": -1.0})


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(init_kl_coef=-0.1), "init_kl_coef"),
        (dict(init_kl_coef=math.nan), "init_kl_coef"),
        (dict(target=0.0), "target"),
        (dict(target=-6.0), "target"),
        (dict(horizon=0), "horizon"),
        (dict(horizon=-10), "horizon"),
        (dict(horizon=math.inf), "horizon"),
    ],
)
def test_adaptive_init_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveKLController(**kwargs)


def test_fixed_init_validation_and_zero_allowed():
    with pytest.raises(ValueError, match="value"):
        FixedKLController(-0.01)
    assert FixedKLController(0.0).value == 0.0
    assert AdaptiveKLController(init_kl_coef=0.0).value == 0.0


def test_update_validation():
    ctrl = AdaptiveKLController()
    with pytest.raises(ValueError, match="current_kl"):
        ctrl.update(math.nan, 10)
    with pytest.raises(ValueError, match="n_steps"):
        ctrl.update(1.0, -1)
    assert ctrl.value == 0.2  # a rejected update leaves the coefficient alone


def test_kl_penalty_hand_values():
    logp = torch.tensor([[0.0, -1.0, -0.5]])
    ref = torch.tensor([[-1.0, 0.0, -0.5]])  # d = (1, -1, 0)
    assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))
    assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([[1.0, 1.0, 0.0]]))
    assert_close(kl_penalty(logp, ref, "mse"), torch.tensor([[0.5, 0.5, 0.0]]))
    # exp(-1) - 1 + 1 = 0.367879..., exp(1) - 1 - 1 = e - 2 = 0.718281...
    assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[0.36787944, 0.71828183, 0.0]]))
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "k2")


def test_k3_is_never_negative():
    g = torch.Generator().manual_seed(6)
    d = torch.cat([
        torch.randn(4000, generator=g) * 5,
        torch.randn(4000, generator=g) * 1e-4,
        torch.randn(4000, generator=g) * 1e-8,
    ])
    ref = torch.randn(d.shape, generator=g) * 3 - 5
    k3 = kl_penalty(ref + d, ref, "k3")
    assert (k3 >= 0).all()
    assert (k3[:4000] > 0).any()
