"""The dense-reward loss's two-pass chunked gradient equals the gradient of the whole loss."""
import torch

from diffrl_fast.algos import make_algorithm
from diffrl_fast.config_utils import load_config
from diffrl_fast.diffusion.recompute import pack_chunk, reference_outputs, step_logprob_of
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.models import load_model
from diffrl_fast.ops import plackett_luce_loss
from diffrl_fast.train.config import Config, validate


def test_two_pass_gradient_equals_direct_gradient():
    cfg = validate(load_config(Config, None, ["algo=dense", "dense.samples_per_prompt=3", "sample.batch_size=6",
                                              "train.batch_size=6", "train.chunk_size=2", "dense.log_ratio_clip=null",
                                              "dense.timestep_sampling=weighted"]))
    model = load_model("digits")
    model.add_lora(rank=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    traj = sample_trajectories(model, ["1", "1", "1", "7", "7", "7"], num_steps=5, guidance_scale=2.0, seeds=list(range(6)))
    rewards = torch.tensor([0.3, -1.0, 0.7, 2.0, 1.0, -3.0])
    algo = make_algorithm(cfg)

    from diffrl_fast.algos.base import RunContext

    # the loss sees only what RunContext names: a hand-made one drives it
    T = RunContext(model=model, device=torch.device("cpu"), autocast_dtype=None, dist=None, prompts=[], reward_fn=None,
                   advantages=None, generator=None, step_groups=None, engine="none", clock=lambda: (0, 0))
    data = algo.prepare(T, traj, rewards)
    mb = torch.arange(6)
    order = torch.tensor([[0, 2, 4], [0, 2, 4], [0, 2, 4], [1, 3, 4], [1, 3, 4], [1, 3, 4]])
    params = model.trainable_parameters()

    # chunked two-pass, as the trainer runs it
    model.denoiser.zero_grad(set_to_none=True)
    ctx = algo.begin_minibatch(T, traj, mb, order, data)
    rows = order.numel()
    for k0 in range(0, 3, 2):
        chunk = pack_chunk(traj, mb, order[:, k0:k0 + 2], "cpu")
        chunk.col0 = k0
        loss, _ = algo.chunk_loss(T, chunk, data, ctx)
        (loss * (chunk.step_idx.numel() / rows)).backward()
    chunked = torch.cat([p.grad.flatten() for p in params])

    # direct: the whole loss in one graph
    model.denoiser.zero_grad(set_to_none=True)
    chunk = pack_chunk(traj, mb, order, "cpu")
    from diffrl_fast.algos.common import policy_outputs

    eu, ec = policy_outputs(T, chunk)
    ru, rc = reference_outputs(model, chunk)
    h = step_logprob_of(chunk, eu, ec) - step_logprob_of(chunk, ru, rc)
    w = cfg.dense.gamma ** order.double()
    e = (h * (w / w.sum(1, keepdim=True)).float()).sum(1)
    ranking = data.extra["ranking"]
    plackett_luce_loss(e[ranking], temperature=cfg.dense.temperature).backward()
    direct = torch.cat([p.grad.flatten() for p in params])
    assert direct.abs().max() > 0
    assert (chunked - direct).abs().max() / direct.abs().max() < 1e-4
    assert abs(float(ctx["loss"]) - float(plackett_luce_loss(e.detach()[ranking], temperature=cfg.dense.temperature))) < 1e-5
