"""Defaults that follow the authors' code beyond the loss: GRPO drops zero-advantage samples (flow_grpo's
train_sd3.py), DiffusionNFT rolls out with its old model (train_nft_sd3.py), DPOK's value function uses AdamW's
default weight decay (dpok/train_online_pg.py); each with the option that keeps the former behaviour."""
from __future__ import annotations

import torch

from diffrl_fast.algos.common import swapped_weights
from diffrl_fast.algos.grpo import zero_advantage_mask
from tests.algos.test_conventions import trainer


def test_zero_advantage_mask_drops_tied_groups_and_pads_to_the_minibatches():
    adv = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.5, -0.5])
    g = torch.Generator().manual_seed(0)
    keep = zero_advantage_mask(adv, 2, g)
    assert keep[3:5].all() and keep[6:].all() and int(keep.sum()) == 4  # 4 non-zero: a multiple of 2 already
    keep = zero_advantage_mask(adv, 3, g)
    assert int(keep.sum()) == 6 and keep[[3, 4, 6, 7]].all()  # 2 zero-advantage samples put back, at random
    assert int(zero_advantage_mask(torch.zeros(8), 2, g).sum()) == 2  # none left: one per minibatch
    draws = {tuple(zero_advantage_mask(adv, 3, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) > 1


def tied_reward(images, prompts, metadata):
    """Prompt "a" always scores 0 (its group's advantages are 0); the others by mean brightness."""
    return torch.tensor([0.0 if p == "a" else float(x.mean()) for x, p in zip(images, prompts)]), {}


def test_grpo_trains_only_on_non_zero_advantages_with_as_many_steps(tmp_path):
    runs = {}
    for drop in ("true", "false"):
        t = trainer(tmp_path, "grpo", "grpo.group_size=2", f"grpo.drop_zero_advantage={drop}", "train.batch_size=2",
                    "train.gradient_accumulation_steps=2", "prompts=[a, b]", scheduler="flow", name=drop)
        t.reward_fn = tied_reward
        traj, rewards = t.sample_epoch(0)
        data = t.algo.prepare(t.run_context, traj, rewards)
        seen = []
        pack = t.algo.chunk_loss
        t.algo.chunk_loss = lambda tr, chunk, d, ctx=None: (seen.append(chunk.sample_idx.tolist()), pack(tr, chunk, d, ctx))[1]
        stats = t.train_epoch(0, traj, data)
        runs[drop] = (traj.prompts, data, seen, stats)
    prompts, data, seen, stats = runs["true"]
    trained = {i for s in seen for i in s}
    assert "a" in prompts and "b" in prompts
    assert trained and all(prompts[i] != "a" for i in trained)  # every trained sample has a non-zero advantage
    assert int((data.advantages != 0).sum()) == len(trained) and data.extra["log"]["zero_adv_dropped"] == 8 - len(trained)
    assert stats["optimizer_steps"] == runs["false"][3]["optimizer_steps"] == 2  # smaller minibatches, not fewer
    assert any(runs["false"][0][i] == "a" for s in runs["false"][2] for i in s)


def test_nft_rolls_out_with_the_old_model(tmp_path):
    outs = {}
    for mode in ("old", "policy"):
        t = trainer(tmp_path, "nft", "nft.group_size=2", "sample.guidance_scale=1.0", f"nft.sample_with={mode}", name=mode)
        with torch.no_grad():  # the policy moves away from the old model
            for p in t.algo.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
        traj, _ = t.sample_epoch(0)
        with torch.no_grad(), swapped_weights(t.algo.params, t.algo.old):
            with_old = t._sample(traj.prompts, traj.seeds.tolist(), epoch=0)
        outs[mode] = torch.equal(traj.final_latents, with_old.final_latents)
    assert outs == {"old": True, "policy": False}


def test_dpok_value_function_uses_adamw_default_weight_decay(tmp_path):
    t = trainer(tmp_path, "dpok")
    assert [g["weight_decay"] for g in t.algo.value_opt.optimizer.param_groups] == [0.01]
    t = trainer(tmp_path, "dpok", "dpok.value_weight_decay=0", name="wd0")
    assert [g["weight_decay"] for g in t.algo.value_opt.optimizer.param_groups] == [0.0]
