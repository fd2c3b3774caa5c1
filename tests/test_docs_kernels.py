"""docs/kernels.md: every python block runs, in order, in one namespace, and each "before" (the peers' step
and loss, written in plain torch on the page) agrees with its "after" (the drop-ins and the fused ops):
samples, log-probs, losses, logged statistics and gradients, to float32 rounding."""
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "kernels.md"


@pytest.fixture(scope="module")
def page() -> dict:
    """The namespace left by running the page's blocks in order (seeded, without moving the global RNG)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 8, "docs/kernels.md lost its snippets"
    namespace: dict = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/kernels.md block {i}", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to float32 rounding, relative to the largest entry of ``expected``."""
    expected = expected.detach().double()
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol,
                               atol=rtol * max(float(expected.abs().max()), 1e-30))


def test_snippets_run_and_reach_every_gradient(page):
    for name in ("eps_u", "eps_c", "v_pred", "v_fused", "eps_u_plain", "eps_c_plain", "v_plain"):
        grad = page[name].grad
        assert grad is not None and bool(grad.abs().sum() > 0), name


def test_ddpo_before_and_after_agree(page):
    p = page
    close(p["next_latents"], p["next_latents_plain"])
    close(p["old_log_prob"], p["old_log_prob_plain"])
    close(p["out"].loss, p["loss_plain"])
    # the plain pair scores one guided tensor twice, so its approx_kl is exactly 0; the fused op forms the
    # guidance inside the kernel (a fused multiply-add where the compiler contracts it), so its log p may sit
    # a float32 rounding (~6e-8) from the rollout's and its approx_kl ~1e-15: an absolute bound, not relative to 0
    assert abs(float(p["out"].approx_kl) - float(p["approx_kl_plain"])) < 1e-12
    close(p["out"].clipfrac, p["clipfrac_plain"])
    close(p["out"].logp, p["log_prob_plain"])
    close(p["eps_u"].grad, p["eps_u_plain"].grad, rtol=1e-4)
    close(p["eps_c"].grad, p["eps_c_plain"].grad, rtol=1e-4)


def test_flow_grpo_before_and_after_agree(page):
    p = page
    close(p["prev"], p["prev_plain"])
    close(p["old_lp"], p["old_lp_plain"])
    close(p["loss"], p["loss_flow_plain"])
    close(p["out_flow"].loss, p["loss_flow_plain"])
    close(p["out_flow"].logp, p["log_prob_flow_plain"])
    close(p["v_pred"].grad, p["v_plain"].grad, rtol=1e-4)
    close(p["v_fused"].grad, p["v_plain"].grad, rtol=1e-4)


def _band_between_rows(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> float:
    """A clip range halfway between the 2nd and 3rd smallest |ratio - 1|: two rows inside the band, two out."""
    dev = (log_prob - old_log_prob).detach().exp().sub(1).abs().sort().values
    assert float(dev[2] - dev[1]) > 1e-5, "rows too close to the band's edge for this check (ratio rounding ~1e-7)"
    return float(dev[1] + dev[2]) / 2


def test_fused_losses_match_the_plain_ones_after_the_policy_moved(page):
    """The page's blocks train at the rollout's policy (ratio 1); here the outputs have moved, as after an
    optimiser step, so the clip is active for some rows and the gradients go through both branches."""
    from diffrl_fast.ops import ppo_clip_step_loss

    p = page
    gen = torch.Generator().manual_seed(1)
    moved = [x + 0.05 * torch.randn(x.shape, generator=gen) for x in (p["eps_uncond"], p["eps_text"], p["v_rollout"])]

    # DDPO: guided DDIM step
    u, c = (x.clone().requires_grad_() for x in moved[:2])
    guided = u + p["guidance_scale"] * (c - u)
    _, lp = p["ddim_step_plain"](p["scheduler"], guided, p["t"], p["latents"], prev_sample=p["next_latents_plain"])
    clip = _band_between_rows(lp, p["old_log_prob_plain"])
    loss, approx_kl, clipfrac = p["ppo_loss_plain"](lp, p["old_log_prob_plain"], p["advantages"], clip_range=clip)
    loss.backward()
    assert float(clipfrac) == 0.5
    fu, fc = (x.clone().requires_grad_() for x in moved[:2])
    co = p["c"]
    out = ppo_clip_step_loss(p["latents"], p["next_latents"], fu, fc, co.a, co.b, p["guidance_scale"], co.s,
                             p["old_log_prob"], p["advantages"], clip_range=clip, adv_clip=5.0)
    out.loss.backward()
    close(out.logp, lp)
    close(out.loss, loss)
    close(out.approx_kl, approx_kl, rtol=2e-3)  # of log p - log p_old: float32 rounding of each, relatively large
    close(out.clipfrac, clipfrac)
    close(fu.grad, u.grad, rtol=1e-4)
    close(fc.grad, c.grad, rtol=1e-4)

    # flow_grpo: SDE step of a velocity model
    v = moved[2].clone().requires_grad_()
    _, lp, _, _ = p["sde_step_plain"](p["flow"], v, p["ts"], p["latents"], prev_sample=p["prev_plain"])
    clip = _band_between_rows(lp, p["old_lp_plain"])
    loss, approx_kl, clipfrac = p["ppo_loss_plain"](lp, p["old_lp_plain"], p["advantages"], clip_range=clip)
    loss.backward()
    assert float(clipfrac) == 0.5
    fv = moved[2].clone().requires_grad_()
    co = p["c_flow"]
    out = ppo_clip_step_loss(p["latents"], p["prev"], fv, None, co.a, co.b, 1.0, co.s, p["old_lp"], p["advantages"],
                             clip_range=clip, adv_clip=5.0)
    out.loss.backward()
    close(out.logp, lp)
    close(out.loss, loss)
    close(out.approx_kl, approx_kl, rtol=2e-3)
    close(out.clipfrac, clipfrac)
    close(fv.grad, v.grad, rtol=1e-4)
