"""The fused PPO step loss (gradients computed in the forward pass) against the float64 oracle and the
recompute path: values, gradients to every input, scaled and extra upstream gradients, bit parity of log p
with step_logprob, and bad inputs named."""
import pytest
import torch

from diffrl_fast.ops import X0Clip, checks, ppo_clip_step_loss, step_logprob, use_backend
from tests.baselines import ddim_affine, random_ddim_rows
from tests.conftest import device_for, requires_cpp
from tests.reference import oracle


def _inputs(device, B=6, T=2, hw=(9, 13), seed=0, cfg=True):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, 4, *hw)
    x, prev, eu, ec = (torch.randn(shape, generator=g).to(device) for _ in range(4))
    abar_t, abar_p, std = random_ddim_rows(B * T, g)
    a, b = (v.reshape(B, T).to(device) for v in ddim_affine(abar_t, abar_p, std))
    std = std.reshape(B, T).to(device)
    with torch.no_grad():
        lp = oracle.step_logprob(x, prev, eu, ec if cfg else None, a, b, 3.0, std).float()
    old = lp + 0.15 * torch.randn(B, T, generator=g).to(device)  # ratios on both sides of the band
    adv = 3.0 * torch.randn(B, T, generator=g).to(device)
    return dict(x=x, prev=prev, eu=eu, ec=ec if cfg else None, a=a, b=b, std=std, old=old, adv=adv)


CASES = [  # (clip_range, clip_mode, reduction, clip_x0, cfg, adv_clip)
    (0.1, "ppo", "mean", False, True, 5.0),
    (0.1, "clamp", "sum", False, True, 1.0),
    (None, "ppo", "mean", True, True, None),
    (0.1, "ppo", "sum", True, False, 5.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("mode", ["fused", "recompute"])
def test_fused_ppo_matches_oracle(backend, mode, case):
    clip_range, clip_mode, reduction, clip, cfg, adv_clip = case
    device = device_for(backend)
    inp = _inputs(device, cfg=cfg)
    clip_x0 = X0Clip(0.9, 1.3, -0.6, 1.5) if clip else None
    leaves = {k: inp[k].clone().requires_grad_() for k in ("x", "prev", "eu", "std") + (("ec",) if cfg else ())}
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    lp64 = oracle.step_logprob(ref["x"], ref["prev"], ref["eu"], ref.get("ec"), inp["a"], inp["b"], 3.0, ref["std"],
                               reduction, None if clip_x0 is None else tuple(clip_x0))
    loss64, clipfrac, approx_kl, ratio_mean = oracle.ppo_loss(lp64, inp["old"], inp["adv"], clip_range, adv_clip,
                                                             clamp_only=clip_mode == "clamp")
    loss64.backward()
    with use_backend(backend):
        out = ppo_clip_step_loss(leaves["x"], leaves["prev"], leaves["eu"], leaves.get("ec"), inp["a"], inp["b"], 3.0,
                                 leaves["std"], inp["old"], inp["adv"], clip_range=clip_range, adv_clip=adv_clip,
                                 clip_mode=clip_mode, reduction=reduction, clip_x0=clip_x0, mode=mode)
        out.loss.backward()
    assert torch.allclose(out.logp.double(), lp64, rtol=2e-5, atol=1e-4)
    assert out.loss.item() == pytest.approx(loss64.item(), rel=1e-4, abs=1e-6)
    if clip_range is not None:
        assert out.clipfrac.item() == pytest.approx(clipfrac)
        assert out.ratio_mean.item() == pytest.approx(ratio_mean.item(), rel=1e-5)
    assert out.approx_kl.item() == pytest.approx(approx_kl.item(), rel=1e-3, abs=1e-7)
    for k, leaf in leaves.items():
        want = ref[k].grad
        err = (leaf.grad.double() - want).abs().max() / want.abs().max().clamp(min=1e-12)
        assert err < 1e-4, (k, float(err))


def test_fused_logp_is_bit_identical_to_step_logprob(backend):
    """The rollout records log p with step_logprob; the fused loss must reproduce it exactly (ratio 1)."""
    device = device_for(backend)
    inp = _inputs(device, B=5, T=3, hw=(64, 64))  # several chunks per row
    with use_backend(backend):
        lp = step_logprob(inp["x"], inp["prev"], inp["eu"], inp["ec"], inp["a"], inp["b"], 7.5, inp["std"])
        eu = inp["eu"].clone().requires_grad_()
        out = ppo_clip_step_loss(inp["x"], inp["prev"], eu, inp["ec"], inp["a"], inp["b"], 7.5, inp["std"], lp,
                                 inp["adv"], mode="fused")
    assert torch.equal(out.logp, lp)
    assert out.ratio_mean.item() == 1.0 and out.clipfrac.item() == 0.0


@requires_cpp
def test_fused_ppo_names_latents_it_cannot_walk_as_rows():
    """Leading dims whose strides split into no outer and inner group (a permuted, subsampled batch): a ValueError
    naming the argument and the fix, not a silent copy or a wrong read."""
    eu = torch.randn(4, 3, 5, 2, 8, 8).permute(2, 0, 1, 3, 4, 5)[:, :, ::2]  # leading [5, 4, 2], strides (128, 1920, 1280)
    x, prev = torch.randn(eu.shape), torch.randn(eu.shape)
    rows = torch.zeros(eu.shape[:3])
    with pytest.raises(ValueError, match=r"eps_u: its leading dims .* pass eps_u\.contiguous\(\)"):
        ppo_clip_step_loss(x, prev, eu.requires_grad_(), None, 0.9, -0.1, 1.0, 0.3, rows, rows, mode="fused")


@requires_cpp
def test_fused_ppo_streamed_gradients():
    """Past 32 MiB of latent data per call the C++ kernel writes eps_c's gradient with non-temporal stores; rows of
    an odd length start unaligned, so the aligned body, its head and its tail all run. Equal to the recompute path."""
    inp = _inputs("cpu", B=24, T=2, hw=(97, 101))  # 48 rows of 4 * 97 * 101 elements: 6 latent tensors > 32 MiB
    assert 6 * inp["x"].numel() * 4 >= 32 << 20
    grads = {}
    for mode in ("fused", "recompute"):
        eu, ec = inp["eu"].clone().requires_grad_(), inp["ec"].clone().requires_grad_()
        ppo_clip_step_loss(inp["x"], inp["prev"], eu, ec, inp["a"], inp["b"], 3.0, inp["std"], inp["old"], inp["adv"],
                           clip_range=0.1, mode=mode).loss.backward()
        grads[mode] = (eu.grad, ec.grad)
    for got, want in zip(grads["fused"], grads["recompute"]):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_fused_ppo_upstream_scale_and_extra_logp_term():
    """(2 L + sum(log p)).backward(): the held gradients are scaled and log p's share is recomputed."""
    inp = _inputs("cpu")
    grads = []
    for mode in ("fused", "recompute"):
        eu, ec = inp["eu"].clone().requires_grad_(), inp["ec"].clone().requires_grad_()
        out = ppo_clip_step_loss(inp["x"], inp["prev"], eu, ec, inp["a"], inp["b"], 3.0, inp["std"], inp["old"],
                                 inp["adv"], clip_range=0.1, mode=mode)
        (2.0 * out.loss + 0.01 * out.logp.sum()).backward()
        grads.append((eu.grad, ec.grad))
    for got, want in zip(*grads):
        assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_fused_ppo_no_grad_and_frozen_inputs():
    inp = _inputs("cpu")
    with torch.no_grad():
        out = ppo_clip_step_loss(inp["x"], inp["prev"], inp["eu"], inp["ec"], inp["a"], inp["b"], 3.0, inp["std"],
                                 inp["old"], inp["adv"], mode="fused")
    ref = ppo_clip_step_loss(inp["x"], inp["prev"], inp["eu"], inp["ec"], inp["a"], inp["b"], 3.0, inp["std"],
                             inp["old"], inp["adv"], mode="recompute")
    assert not out.loss.requires_grad and torch.allclose(out.loss, ref.loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("what", ["std", "eps_u", "old_logp"])
def test_fused_ppo_names_bad_input(what):
    inp = _inputs("cpu")
    if what == "std":
        inp["std"][1, 0] = 0.0
    elif what == "eps_u":
        inp["eu"][2, 1, 0, 3, 3] = float("nan")
    else:
        inp["old"][0, 0] = float("inf")
    with pytest.raises(ValueError, match={"std": "s must be > 0", "eps_u": "eps_u contains", "old_logp": "old_logp"}[what]):
        ppo_clip_step_loss(inp["x"], inp["prev"], inp["eu"], inp["ec"], inp["a"], inp["b"], 3.0, inp["std"], inp["old"],
                           inp["adv"], mode="fused")
    with checks(False):  # data checks off: no error, no scan (the caller asked for speed)
        ppo_clip_step_loss(inp["x"], inp["prev"], inp["eu"], inp["ec"], inp["a"], inp["b"], 3.0, inp["std"], inp["old"],
                           inp["adv"], mode="fused")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_fused_ppo_low_and_double_precision(dtype):
    """Half-precision inputs accumulate in float32 and return gradients in their dtype; float64 stays float64."""
    inp = _inputs("cpu")
    x, prev, eu, ec = (inp[k].to(dtype) for k in ("x", "prev", "eu", "ec"))
    outs = {}
    for mode in ("fused", "recompute"):
        e = eu.clone().requires_grad_()
        out = ppo_clip_step_loss(x, prev, e, ec, inp["a"], inp["b"], 3.0, inp["std"], inp["old"], inp["adv"],
                                 clip_range=0.1, mode=mode)
        out.loss.backward()
        outs[mode] = (out, e.grad)
    (f, gf), (r, gr) = outs["fused"], outs["recompute"]
    assert gf.dtype == dtype and f.logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(f.logp, r.logp)
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    assert (gf.double() - gr.double()).abs().max() <= tol * gr.double().abs().max()


def test_fused_ppo_argument_forms():
    """The C++ path's shortcuts (per-row tensors used in place, contiguous rows) and its conversions give the
    recompute path's loss and gradients for every form of argument: numpy and int coefficients, a 0-dim and a
    [B, 1] std, float64 per-row constants, and a strided [:, :-1] slice of a trajectory."""
    import numpy as np

    inp = _inputs("cpu", T=3)
    traj = torch.cat([inp["x"], inp["x"][:, :1]], dim=1)  # [B, T+1, ...]: x is a strided slice of it
    forms = [
        dict(x=inp["x"], a=np.float64(0.9), g=3, s=torch.tensor(0.7), old=torch.float64),
        dict(x=traj[:, :-1], a=inp["a"], g=3.0, s=inp["std"][:, :1], old=torch.float32),
    ]
    noise = 0.15 * torch.randn(inp["old"].shape, generator=torch.Generator().manual_seed(1))
    for f in forms:
        assert f is forms[0] or not f["x"].is_contiguous()
        lp = step_logprob(f["x"], inp["prev"], inp["eu"], inp["ec"], f["a"], inp["b"], f["g"], f["s"])
        f["old"] = (lp + noise).to(f["old"])  # ratios on both sides of the clip band
        res = {}
        for mode in ("fused", "recompute"):
            eu = inp["eu"].clone().requires_grad_()
            out = ppo_clip_step_loss(f["x"], inp["prev"], eu, inp["ec"], f["a"], inp["b"], f["g"], f["s"], f["old"],
                                     inp["adv"], clip_range=0.1, mode=mode)
            out.loss.backward()
            res[mode] = (out.loss.detach(), out.logp, eu.grad)
        (lf, pf, gf), (lr, pr, gr) = res["fused"], res["recompute"]
        assert torch.equal(pf, pr) and pf.shape == inp["old"].shape
        assert torch.allclose(lf, lr, rtol=1e-5, atol=1e-7)
        assert (gf - gr).abs().max() <= 1e-5 * gr.abs().max()


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_from_the_saved_residual(backend, guided, monkeypatch):
    """Unclipped, the Triton and torch backends' fused mode writes the residual y - mean in forward and scales it
    per row into every gradient (x_t, x_prev, eps_u, eps_c): equal to the recompute path's; on Triton it is what
    mode="auto" runs (the lower-traffic mode), clipped it is not."""
    from diffrl_fast.ops import backends

    mod = backends.get(backend)  # (the C++ backend has its own fused kernel)
    calls = []
    monkeypatch.setattr(mod, "scale_rows", lambda *a, _f=mod.scale_rows: calls.append(1) or _f(*a))
    inp = _inputs(device_for(backend), cfg=guided)
    res = {}
    for mode in ("auto", "fused", "recompute"):
        leaves = [inp[k].clone().requires_grad_() for k in ("x", "prev", "eu")] + ([inp["ec"].clone().requires_grad_()] if guided else [None])
        with use_backend(backend):
            out = ppo_clip_step_loss(*leaves, inp["a"], inp["b"], 3.0, inp["std"], inp["old"], inp["adv"], clip_range=0.1,
                                     mode=mode)
        out.loss.backward()
        res[mode] = (out.logp, [t.grad for t in leaves if t is not None], len(calls))
    assert res["fused"][2] - res["auto"][2] == 1  # fused ran scale_rows once
    assert res["auto"][2] == (1 if backend == "triton" else 0)  # auto is fused on Triton only
    assert res["recompute"][2] == res["fused"][2]  # recompute never uses it
    assert torch.equal(res["fused"][0], res["recompute"][0])
    for got, want in zip(res["fused"][1], res["recompute"][1]):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with use_backend(backend):  # clipped: auto stays on the recompute path
        before = len(calls)
        leaves = [inp[k].clone().requires_grad_() for k in ("x", "prev", "eu")]
        ppo_clip_step_loss(*leaves, inp["ec"] if guided else None, inp["a"], inp["b"], 3.0, inp["std"], inp["old"],
                           inp["adv"], clip_x0=X0Clip(0.9, 1.3, -0.6, 1.5)).loss.backward()
        assert len(calls) == before


def test_saved_residual_in_half_precision(monkeypatch):
    """bfloat16 keeps the residual path (the residual stored in bfloat16: one more rounding, within half-precision
    tolerance of the recompute path); float16 keeps the two-pass form (its residual would lose small values)."""
    from diffrl_fast.ops import backends

    mod = backends.get("torch")
    calls = []
    monkeypatch.setattr(mod, "scale_rows", lambda *a, _f=mod.scale_rows: calls.append(a[0].dtype) or _f(*a))
    inp = _inputs("cpu")
    for dtype in (torch.bfloat16, torch.float16):
        grads = {}
        for mode in ("fused", "recompute"):
            eu = inp["eu"].to(dtype).clone().requires_grad_()
            with use_backend("torch"):
                out = ppo_clip_step_loss(inp["x"].to(dtype), inp["prev"].to(dtype), eu, inp["ec"].to(dtype), inp["a"],
                                         inp["b"], 3.0, inp["std"], inp["old"], inp["adv"], clip_range=0.1, mode=mode)
            out.loss.backward()
            grads[mode] = eu.grad.double()
        assert (grads["fused"] - grads["recompute"]).abs().max() <= 2e-2 * grads["recompute"].abs().max()
    assert calls == [torch.bfloat16]


def test_auto_on_triton_is_recompute_for_float16(monkeypatch):
    from diffrl_fast.ops import backends

    mod = backends.get("triton")
    calls = []
    monkeypatch.setattr(mod, "scale_rows", lambda *a, _f=mod.scale_rows: calls.append(1) or _f(*a))
    inp = _inputs(device_for("triton"), B=2, T=1)
    eu = inp["eu"].half().requires_grad_()
    with use_backend("triton"):
        ppo_clip_step_loss(inp["x"].half(), inp["prev"].half(), eu, inp["ec"].half(), inp["a"], inp["b"], 3.0, inp["std"],
                           inp["old"], inp["adv"]).loss.backward()
    assert calls == [] and eu.grad is not None and eu.grad.dtype == torch.float16
