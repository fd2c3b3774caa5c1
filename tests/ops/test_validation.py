"""Bad inputs raise ValueError naming the argument, never a silent wrong result (property-based)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffrl_fast.ops import checks, gaussian_logprob, ppo_clip_loss, step_kl, step_logprob, use_backend

LATENT_ARGS = ("x_t", "x_prev", "eps_u", "eps_c")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _args(lead, latent, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, *latent)
    return {n: torch.randn(shape, generator=g) for n in LATENT_ARGS}


def _call(t, a=0.9, b=-0.2, g=3.0, s=0.5, **kw):
    return step_logprob(t["x_t"], t["x_prev"], t["eps_u"], t["eps_c"], a, b, g, s, **kw)


shapes = st.tuples(
    st.lists(st.integers(1, 3), min_size=1, max_size=2),  # leading dims
    st.lists(st.integers(1, 5), min_size=3, max_size=3),  # C, H, W
)


@SETTINGS
@given(shape=shapes, arg=st.sampled_from(LATENT_ARGS), value=st.sampled_from([math.nan, math.inf, -math.inf]), data=st.data())
def test_nonfinite_latent_is_named(backend, shape, arg, value, data):
    t = _args(*shape)
    flat = t[arg].view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = value
    with use_backend(backend), pytest.raises(ValueError, match=rf"\b{arg}\b.*non-finite"):
        _call(t)


@SETTINGS
@given(shape=shapes, s=st.sampled_from([0.0, -1.0, -1e-9, math.nan, math.inf]), as_tensor=st.booleans())
def test_bad_std_is_named(backend, shape, s, as_tensor):
    t = _args(*shape)
    std = torch.full(tuple(shape[0]), s) if as_tensor else s
    with use_backend(backend), pytest.raises(ValueError, match=r"\bs\b"):
        _call(t, s=std)
    with use_backend(backend), pytest.raises(ValueError, match=r"\bstd\b|\bs\b"):
        gaussian_logprob(t["x_prev"], t["x_t"], std)


@SETTINGS
@given(shape=shapes, arg=st.sampled_from(LATENT_ARGS), fault=st.sampled_from(["shape", "dtype", "device", "strides", "type"]))
def test_mismatched_latent_is_named(backend, shape, arg, fault):
    t = _args(*shape)
    x = t[arg]
    if fault == "shape":
        t[arg] = torch.randn(*x.shape[:-1], x.shape[-1] + 1)
    elif fault == "dtype":
        t[arg] = x.double() if arg != "x_t" else x.half()
    elif fault == "device":
        t[arg] = x.to("meta")
    elif fault == "strides":
        if x.shape[-1] < 2 or x.shape[-2] < 2:  # a 1-wide dim makes any stride contiguous: nothing to reject
            return
        t[arg] = torch.randn(*x.shape[:-2], x.shape[-1], x.shape[-2]).transpose(-1, -2)
    else:
        t[arg] = x.numpy()
    with use_backend(backend), pytest.raises(ValueError, match=rf"\b{arg}\b"):
        _call(t)


@SETTINGS
@given(coef=st.sampled_from(["a", "b", "g"]), bad=st.sampled_from(["nan", "shape", "type"]))
def test_bad_coefficients_are_named(backend, coef, bad):
    t = _args((2, 3), (4, 3, 3))
    value = {"nan": math.nan, "shape": torch.ones(5), "type": "0.5"}[bad]
    with use_backend(backend), pytest.raises(ValueError, match=rf"\b{coef}\b"):
        _call(t, **{coef: value})


def test_other_argument_errors(backend):
    t = _args((2,), (4, 3, 3))
    with use_backend(backend):
        with pytest.raises(ValueError, match="reduction"):
            _call(t, reduction="avg")
        with pytest.raises(ValueError, match="latent_dims"):
            _call(t, latent_dims=0)
        with pytest.raises(ValueError, match="x_t"):
            _call(t, latent_dims=5)
        with pytest.raises(ValueError, match="ref_eps_c"):
            step_kl(t["x_t"], t["eps_u"], t["eps_c"], t["eps_u"], None, 1.0, 1.0, 1.0, 1.0)
        with pytest.raises(ValueError, match="advantages"):
            ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0.0, math.nan]))
        with pytest.raises(ValueError, match="old_logp"):
            ppo_clip_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_checks_can_be_disabled_for_speed(backend):
    t = _args((2,), (4, 3, 3))
    t["eps_u"][0, 0, 0, 0] = math.nan
    with use_backend(backend), checks(False):
        out = _call(t)  # no data checks: the NaN propagates instead of raising
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
