"""MixGRPO-Flash's post-window ODE: the compressed grid and the DPM-Solver++(2M) step against a float64
transcription of MixGRPO's sampling code (tests/reference/algorithms.py), its second order on an ODE whose
solution is known, and the rollout: fewer denoiser passes, the trained window steps unchanged."""
import dataclasses
import math

import pytest
import torch

from diffrl_fast.diffusion.coefficients import dpm_solver_pp_2m, make_schedule, post_window_ode
from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from tests.reference.algorithms import mixgrpo_dpm_tail, mixgrpo_post_sigmas


def gaussian_velocity(c):
    """The exact flow-matching velocity E[z - x0 | x_sigma] for data x0 ~ N(0, c^2 I): linear in x."""
    return lambda x, s: (s - (1 - s) * c * c) / ((1 - s) ** 2 * c * c + s * s) * x


def integrate(x, v_fn, sigmas, solver):
    prev = s_prev = None
    for k in range(len(sigmas) - 1):
        s, s1 = float(sigmas[k]), float(sigmas[k + 1])
        v = v_fn(x, s)
        if solver == "euler":
            x = x + (s1 - s) * v
        else:
            x, prev = dpm_solver_pp_2m(x, v, s, s1, prev, s_prev)
            s_prev = s
    return x


def test_dpm_solver_is_second_order_on_a_known_ode():
    # x0 ~ N(0, c^2): the marginal at sigma is N(0, V), V = (1 - sigma)^2 c^2 + sigma^2, and the probability-flow ODE
    # maps x at sigma_a to x sqrt(V_b / V_a) at sigma_b; steps uniform in lambda = log((1 - sigma) / sigma), DPM-Solver's
    # variable (uniform in sigma the last steps keep a fixed lambda-size, whatever their number)
    c, sa, sb = 0.5, 0.6, 0.05
    V = lambda s: (1 - s) ** 2 * c * c + s * s  # noqa: E731
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)
    exact = x * math.sqrt(V(sb) / V(sa))

    def grid(n):
        lam = torch.linspace(math.log((1 - sa) / sa), math.log((1 - sb) / sb), n + 1, dtype=torch.float64)
        return 1 / (1 + lam.exp())

    err = {k: [float((integrate(x, gaussian_velocity(c), grid(n), k) - exact).abs().max()) for n in (8, 16, 32)]
           for k in ("euler", "dpmsolver++")}
    assert all(err["dpmsolver++"][i] < err["euler"][i] / 5 for i in range(3))
    assert err["euler"][1] / err["euler"][2] == pytest.approx(2, rel=0.25)  # first order
    assert err["dpmsolver++"][1] / err["dpmsolver++"][2] > 3.3  # second order


def test_dpm_tail_matches_mixgrpo():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.3
    v_fn = lambda x, s: torch.tanh(x @ W) * (1 + s)  # noqa: E731  (any smooth velocity field)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.55, 0.4, 0.22, 0.08, 0.0], dtype=torch.float64)
    s_hist = 0.7
    x_hist = x + 0.1 * torch.randn(3, 6, generator=g, dtype=torch.float64)  # the window's last state
    m_hist = x_hist - s_hist * v_fn(x_hist, s_hist)
    want = mixgrpo_dpm_tail(x, v_fn, sig, m_hist, s_hist)
    prev, s_prev, y = m_hist, s_hist, x
    for k in range(len(sig) - 1):
        y, prev = dpm_solver_pp_2m(y, v_fn(y, float(sig[k])), float(sig[k]), float(sig[k + 1]), prev, s_prev)
        s_prev = float(sig[k])
    assert torch.allclose(y, want, atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def flow_model():
    from diffrl_fast.models import load_model

    return load_model("flow-digits")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_compressed_grid_matches_mixgrpo(flow_model, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    N, L = 25, 3
    sched = FlowMatchEulerDiscreteScheduler.from_config({**flow_model.scheduler.config, "shift": shift})
    base = make_schedule(sched, N, window=torch.arange(N) <= L)
    # MixGRPO's own sigma grid, shift(linspace(1, 0, N + 1)), fed through our schedule
    u = torch.linspace(1, 0, N + 1, dtype=torch.float64)
    theirs = shift * u / (1 + (shift - 1) * u)
    base = dataclasses.replace(base, timesteps=(theirs[:-1] * 1000).float())
    for ratio in (0.4, 0.2):
        tail = post_window_ode(sched, base, solver="dpmsolver++", compress=ratio)
        want = mixgrpo_post_sigmas(theirs, L, ratio, shift)[L + 1:]
        assert tail.start == L + 1 and torch.allclose(tail.sigmas, want, atol=1e-6, rtol=0)
    assert post_window_ode(sched, base, solver="euler", compress=1.0) is None  # the schedule's own steps
    assert torch.allclose(post_window_ode(sched, base, solver="dpmsolver++").sigmas[:-1], theirs[L + 1:-1], atol=1e-6)


def test_flash_rollout_fewer_passes_same_window(flow_model):
    model = flow_model
    T, prompts, seeds = 10, ["3 left of 8", "7", "two 5s", "1"], [11, 12, 13, 14]
    window = torch.arange(T) < 4
    sched = make_schedule(model.scheduler, T, window=window)
    plain_start = model.denoiser_passes
    plain = sample_trajectories(model, prompts, num_steps=T, guidance_scale=1.0, seeds=seeds, schedule=sched)
    plain_passes = model.denoiser_passes - plain_start
    tail = post_window_ode(model.scheduler, sched, solver="dpmsolver++", compress=0.6)
    assert tail.start == 4 and tail.sigmas.numel() == 4  # int((10 - 3) x 0.6) = 4 levels: 3 steps instead of 6
    start = model.denoiser_passes
    flash = sample_trajectories(model, prompts, num_steps=T, guidance_scale=1.0, seeds=seeds, schedule=sched, post_window=tail)
    assert plain_passes == 4 * T and model.denoiser_passes - start == 4 * (4 + 3)
    # the window (what training reads) is the plain rollout's; the image comes from the tail
    assert torch.equal(flash.log_probs, plain.log_probs) and torch.equal(flash.latents[:, :5], plain.latents[:, :5])
    assert not torch.equal(flash.final_latents, plain.final_latents)
    assert float((flash.images - plain.images).abs().mean()) < 0.05  # the same images, integrated differently
    assert parity_report(model, flash, batch_size=4, chunk_size=2)["worst"] <= 1e-5
    # a tree's leaves are distinct after its last split (inside the window): the tail runs once per leaf
    from diffrl_fast.diffusion.tree import TreeSpec

    tree = dict(tree=TreeSpec((0, 2), 2), num_steps=T, guidance_scale=1.0, seeds=seeds, schedule=sched)
    start = model.denoiser_passes
    t_plain = sample_trajectories(model, ["5"] * 4, **tree)
    mid = model.denoiser_passes
    t_flash = sample_trajectories(model, ["5"] * 4, post_window=tail, **tree)
    assert (mid - start) - (model.denoiser_passes - mid) == 4 * (6 - 3)
    assert torch.equal(t_flash.log_probs, t_plain.log_probs)
    with pytest.raises(ValueError, match="last stochastic step"):
        sample_trajectories(model, prompts, num_steps=T, guidance_scale=1.0, seeds=seeds, schedule=sched,
                            post_window=dataclasses.replace(tail, start=3))


def test_dpm_step_from_pure_noise_is_the_euler_step():
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    y, x0 = dpm_solver_pp_2m(x, v, 1.0, 0.7, None, None)  # alpha = 0 at sigma = 1: lambda = -inf
    assert torch.allclose(y, x + (0.7 - 1.0) * v, atol=1e-12) and torch.equal(x0, x - v)


def test_deterministic_rollout_solved_whole(flow_model):
    """A forward-process algorithm's rollout has no stochastic step (L = -1): the ODE solves it from x_0 over the
    schedule's own noise levels (Euler through that grid is exactly the schedule's steps) or a compressed grid."""
    from diffrl_fast.diffusion.coefficients import PostWindowODE

    model = flow_model
    T, prompts, seeds = 10, ["3 left of 8", "7", "two 5s", "1"], [21, 22, 23, 24]
    ode = make_schedule(model.scheduler, T, window=torch.zeros(T, dtype=torch.bool))
    own = post_window_ode(model.scheduler, ode, solver="dpmsolver++")
    assert own.start == 0 and own.sigmas.numel() == T + 1 and float(own.sigmas[0]) == pytest.approx(float(ode.timesteps[0]) / 1000)
    assert post_window_ode(model.scheduler, ode, solver="euler", compress=1.0) is None
    short = post_window_ode(model.scheduler, ode, solver="dpmsolver++", compress=0.4)
    assert short.start == 0 and short.sigmas.numel() == 4 and float(short.sigmas[-1]) == 0  # int(11 x 0.4) = 4 levels, 3 passes
    keep = torch.zeros(T + 1, dtype=torch.bool)  # the forward-process algorithms keep only x_T
    run = lambda **kw: sample_trajectories(model, prompts, num_steps=T, guidance_scale=1.0, seeds=seeds, schedule=ode,  # noqa: E731
                                           keep_latents=keep, **kw)
    plain = run()
    euler = run(post_window=PostWindowODE(0, own.sigmas, "euler"))
    assert torch.allclose(euler.final_latents, plain.final_latents, atol=1e-5, rtol=0)
    start = model.denoiser_passes
    fast = run(post_window=short)
    assert model.denoiser_passes - start == 4 * 3
    assert float((fast.images - plain.images).abs().mean()) < 0.05  # the same images, in 3 passes instead of 10


def test_forward_process_algorithms_roll_out_with_the_solver(tmp_path):
    """algo=dgpo with the solver options: no timestep window needed; rollouts of 3 passes a sample (int(11 x 0.4) = 4
    noise levels), training on the 10-step grid's timesteps as without them."""
    import json

    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import PRESETS, Config, validate
    from diffrl_fast.train.trainer import Trainer

    over = ["algo=dgpo", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8", "dgpo.group_size=4",
            "dgpo.train_timesteps=2", "num_epochs=1", "log.eval_samples=0", "guard.heldout_reward=[]", "log.progress=false",
            "log.tensorboard=false", "log.grid_samples=0", f"output_dir={tmp_path}", "name=r"]
    passes = {}
    for name, extra in (("euler", []), ("dpm", ["sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.4"])):
        cfg = validate(load_config(Config, PRESETS / "flow_digits.yaml", [*over, f"name={name}", *extra]))
        Trainer(cfg, tmp_path / name, log_fn=lambda s: None).run()
        record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert math.isfinite(record["loss"])
        passes[name] = record["denoiser_passes"]
    assert passes["euler"] - passes["dpm"] == 8 * (10 - 3)  # the rollout's passes only


def test_options_need_a_window_and_a_flow_model(tmp_path):
    from diffrl_fast.config_utils import ConfigError, load_config
    from diffrl_fast.train.config import PRESETS, Config, validate
    from diffrl_fast.train.trainer import Trainer

    flash = ["sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.5"]
    with pytest.raises(ConfigError, match="timestep window"):
        validate(load_config(Config, PRESETS / "flow_digits.yaml", flash))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        validate(load_config(Config, PRESETS / "flow_digits.yaml", ["train.timestep_window=fixed", "sample.post_window_compress=0"]))
    cfg = validate(load_config(Config, PRESETS / "digits.yaml", [*flash, "train.timestep_window=fixed", f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="flow-matching model"):
        Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)
