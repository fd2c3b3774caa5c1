"""DPOK: policy optimisation with KL regularisation (Fan et al. 2023, "DPOK: Reinforcement Learning for
Fine-tuning Text-to-Image Diffusion Models"; reference: google-research/google-research, dpok/train_online_pg.py,
dpok/pipeline_stable_diffusion_extended.py, dpok/reward_model.py).

Per trained transition (x_t, x_{t-1}) of step j, as the reference computes it:

    A     = r - V(x_t, c, j)          (raw reward minus the learned value; A = r without the value function)
    rho   = exp(log p_theta(x_{t-1} | x_t, c) - log p_old)
    L     = alpha * E[ -A clamp(rho, 1 - eps, 1 + eps) ]  +  beta * E[ mean_elements (eps_hat_theta - eps_hat_pre)^2 ]

eps_hat are the guided predictions of the policy and of the pretrained model (the LoRA adapter switched
off, or a frozen copy) on the same stored x_t. Options (``dpok.*``): the exact Gaussian KL instead of the
eps MSE (``kl_form=exact``), DDPO's PPO clipping (``ratio_clip=ppo``), the trainer's normalised and clipped
advantages (``advantage=normalized``), no value function (``value_baseline=false``).

The value function V (``critic.StepValueNet``) is fitted once per epoch before the policy update, as the
reference does per round: ``value_steps`` micro-batches of ``value_batch_size`` transitions drawn
uniformly from the epoch's, mean squared error to the trajectory's reward, one AdamW step.
"""
from __future__ import annotations

import torch

from ..diffusion.recompute import trainable_steps
from .base import EpochData
from .critic import CriticOptimizer, StepValueNet, prompt_embedding
from .ddpo import PolicyGradientWithKL


class DPOK(PolicyGradientWithKL):
    name = "dpok"
    reference = "google-research/google-research: dpok/train_online_pg.py, dpok/pipeline_stable_diffusion_extended.py, dpok/reward_model.py"
    needs_reference = True

    @classmethod
    def reference_defaults(cls, n_prompts):
        # 6 samples per round, 5 optimiser steps of 24 transitions each (12 micro-batches of 2): 120 of the
        # round's 300 transitions; gradients clipped at 0.1; AdamW lr 1e-5 without weight decay; 50 DDIM steps, g = 7.5
        return {"train.learning_rate": 1e-5, "train.max_grad_norm": 0.1, "train.adam_weight_decay": 0.0,
                "sample.guidance_scale": 7.5, "sample.batch_size": 6, "sample.num_batches_per_epoch": 1,
                "train.batch_size": 6, "train.timestep_fraction": 0.4, "train.chunk_size": 4,
                "train.gradient_accumulation_steps": 1, "train.optimizer_step_every": "chunks", "num_epochs": 2000}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        c = cfg.dpok
        self.alpha, self.beta, self.kl_form = c.alpha, c.beta, c.kl_form
        self.clip_mode = "ppo" if c.ratio_clip == "ppo" else "clamp"
        self.value: StepValueNet | None = None
        self.value_opt: CriticOptimizer | None = None

    @property
    def adv_clip(self):
        return self.cfg.train.adv_clip_max if self.cfg.dpok.advantage == "normalized" else None

    def setup(self, run) -> None:
        c = self.cfg
        if not c.dpok.value_baseline:
            return
        shape = run.model.latent_shape_for(c.sample.height, c.sample.width)
        cond = prompt_embedding(run.model.encode_prompts([run.prompts[0]]))
        with torch.random.fork_rng(devices=[]):  # the same initial value function on every process
            torch.manual_seed(c.seed)
            self.value = StepValueNet(int(torch.Size(shape).numel()), int(cond.shape[-1]), c.sample.num_steps).to(run.device)
        self.value_opt = CriticOptimizer(self.value, lr=c.dpok.value_lr, weight_decay=c.dpok.value_weight_decay)

    def _value_inputs(self, traj, b, j, device):
        x = traj.latents_at(b, j).to(device)
        return x, prompt_embedding(traj.cond.index(b.to(traj.cond.hidden.device))).to(device), j.to(device)

    def prepare(self, run, traj, rewards):
        c = self.cfg.dpok
        r = rewards.float() if c.advantage == "raw" else run.advantages(traj.prompts, rewards).float()
        if self.value is None:
            return EpochData(r)
        steps = trainable_steps(traj)
        B, T = len(traj), traj.num_steps
        b_all = torch.arange(B).repeat_interleave(steps.numel())
        j_all = steps.repeat(B)
        # fit: value_steps micro-batches of transitions drawn uniformly, one optimiser step
        g = run.generator(run.epoch, 13, run.dist.rank)
        self.value.train()
        total = 0.0
        for _ in range(c.value_steps):
            pick = torch.randperm(b_all.numel(), generator=g)[: c.value_batch_size]
            b, j = b_all[pick], j_all[pick]
            pred = self.value(*self._value_inputs(traj, b, j, run.device))
            loss = torch.nn.functional.mse_loss(pred, r[b].to(pred.device)) / c.value_steps
            loss.backward()
            total += float(loss.detach())
        self.value_opt.step(run.dist)
        # advantages with the updated value function
        self.value.eval()
        adv = torch.zeros(B, T)
        with torch.no_grad():
            for i in range(0, b_all.numel(), 1024):
                b, j = b_all[i:i + 1024], j_all[i:i + 1024]
                adv[b, j] = r[b] - self.value(*self._value_inputs(traj, b, j, run.device)).float().cpu()
        return EpochData(adv, {"log": {"value_loss": total}})

    def state_dict(self):
        return {"value": self.value_opt.state_dict()} if self.value_opt is not None else {}

    def load_state_dict(self, state):
        if state.get("value") is not None:
            if self.value_opt is None:
                raise ValueError("the checkpoint holds a DPOK value function but dpok.value_baseline is off")
            self.value_opt.load_state_dict(state["value"])
