"""A temporal critic R_phi(x_t, c): the final reward predicted from an intermediate denoising state.

TDPO (Zhang et al. 2024, "Confronting Reward Overoptimization for Diffusion Models: A Perspective of
Inductive and Primacy Biases") trains it by regression,

    min_phi  E[ (R_phi(x_t, c) - r(x_0, c))^2 ],

and weights each step's importance ratio by the temporal reward T_phi(x_t, c) = r(x_0, c) - R_phi(x_t, c).
DPOK's optional value baseline (Fan et al. 2023) is the same regression. TDPO-R fights the critic's
primacy bias by periodically re-initialising its *active* neurons (see ``reset_active_neurons``).

Architecture: two convolutions and an average pool to 4x4 over x_t, a sinusoidal embedding of t, a linear
projection of the token-averaged conditioning; concatenated into one ReLU hidden layer (the neurons
TDPO-R resets) and a scalar output.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    """Sinusoidal features sin/cos(t w_k), w_k = 1000^(-k/half): DDPM-style integer and flow-matching float t alike."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angle = t.float()[:, None] * freqs[None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class TemporalCritic(nn.Module):
    def __init__(self, in_channels: int, cond_dim: int, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        # spatial layout matters (which digit, where): pool to 4x4, not to 1x1
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.t_proj = nn.Linear(16, width)
        self.c_proj = nn.Linear(cond_dim, width)
        self.fc1 = nn.Linear(18 * width, hidden)  # TDPO-R's neurons: the ReLU units of this layer
        self.fc2 = nn.Linear(hidden, 1)

    def hidden(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ReLU activations of the hidden layer, [N, hidden]; cond is [N, L, D] (averaged over tokens)."""
        feats = torch.cat([self.conv(x.float()), self.t_proj(timestep_embedding(t)), self.c_proj(cond.float().mean(1))], dim=-1)
        return torch.relu(self.fc1(feats))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x, t, cond)).squeeze(-1)


class CriticTrainer:
    """The critic, its optimiser, and the per-epoch regression on (x_t, t, c) -> r(x_0, c)."""

    def __init__(self, in_channels: int, cond_dim: int, *, lr: float, epochs: int, batch_size: int, device,
                 generator_seed: int) -> None:
        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(generator_seed)
            self.critic = TemporalCritic(in_channels, cond_dim).to(device)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.epochs, self.batch_size, self.device = epochs, batch_size, device
        self.initialised = False

    @staticmethod
    def rows(traj, steps: torch.Tensor):
        """All (sample, step) rows of a trajectory batch: x_t [N, C, H, W], t [N], cond [N, L, D], sample index [N]."""
        B = len(traj)
        b = torch.arange(B).repeat_interleave(steps.numel())
        j = steps.repeat(B)
        return traj.latents[b, j], traj.schedule.timesteps[j], traj.cond.hidden[b.to(traj.cond.hidden.device)], b

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        self.critic.eval()
        out = [self.critic(x[i:i + batch].to(self.device), t[i:i + batch].to(self.device), cond[i:i + batch].to(self.device)).cpu()
               for i in range(0, x.shape[0], batch)]
        return torch.cat(out)

    def fit(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> float:
        """Regress the critic onto ``target`` for ``epochs`` passes; returns the last pass's mean squared error."""
        if not self.initialised:  # start the output at the first batch's mean reward: no wasted steps on the offset
            with torch.no_grad():
                self.critic.fc2.bias.fill_(float(target.mean()))
            self.initialised = True
        self.critic.train()
        n = x.shape[0]
        last = float("nan")
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=generator)
            total = 0.0
            for i in range(0, n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                pred = self.critic(x[idx].to(self.device), t[idx].to(self.device), cond[idx].to(self.device))
                loss = torch.nn.functional.mse_loss(pred, target[idx].to(self.device).float())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach()) * idx.numel()
            last = total / n
        return last

    @torch.no_grad()
    def reset_active_neurons(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, threshold: float,
                             generator: torch.Generator) -> torch.Tensor:
        """TDPO-R's reset: re-initialise the hidden neurons that are active on recent data.

        A neuron's score is its mean activation over (x, t, cond) divided by the layer's mean score;
        neurons with score > ``threshold`` (0: activation > 0 anywhere in the data) are reset the way ReDo
        resets neurons (Sokar et al. 2023): fresh incoming weights and bias from the layer's initial
        distribution, zero outgoing weights, and their optimiser moments cleared. Every other weight is
        left untouched. Returns the boolean mask of reset neurons.
        """
        self.critic.eval()
        acts = torch.cat([self.critic.hidden(x[i:i + 1024].to(self.device), t[i:i + 1024].to(self.device),
                                             cond[i:i + 1024].to(self.device)) for i in range(0, x.shape[0], 1024)])
        score = acts.mean(0)
        score = score / score.mean().clamp(min=1e-12)
        mask = score > threshold
        fc1, fc2 = self.critic.fc1, self.critic.fc2
        bound = 1 / math.sqrt(fc1.in_features)  # nn.Linear's default initialisation
        fresh_w = (torch.rand(fc1.weight.shape, generator=generator) * 2 - 1) * bound
        fresh_b = (torch.rand(fc1.bias.shape, generator=generator) * 2 - 1) * bound
        on_cpu = mask.cpu()  # the fresh weights are drawn on the CPU (a CPU generator), the mask lives with the critic
        fc1.weight[mask] = fresh_w[on_cpu].to(fc1.weight)
        fc1.bias[mask] = fresh_b[on_cpu].to(fc1.bias)
        fc2.weight[:, mask] = 0.0
        for p, rows in ((fc1.weight, mask), (fc1.bias, mask)):
            st = self.optimizer.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k][rows] = 0.0
        st = self.optimizer.state.get(fc2.weight, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                st[k][:, mask] = 0.0
        return mask

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict(), "initialised": self.initialised}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.initialised = bool(state["initialised"])
