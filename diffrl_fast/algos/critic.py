"""Critics of the denoising MDP: TDPO's temporal critic and DPOK's value function, their optimiser, and
TDPO-R's reset of active neurons.

Two architectures, each as its authors build it:

- ``EmbeddingCritic`` (TDPO, Zhang et al. 2024; ZiyiZhang27/tdpo, critic_model.py): R_phi(x_t) = MLP(e(x_t)),
  e = an image encoder's L2-normalised embedding of the decoded state x_t (CLIP in the paper), the MLP the
  LAION aesthetic head's layers: Linear(d, 1024)-Dropout(0.2)-Linear(1024, 128)-Dropout(0.2)-Linear(128, 64)
  -Dropout(0.1)-Linear(64, 16)-Linear(16, 1), without activations, weights ~ N(0, (1/(d+1))^2), biases 0.
  It sees neither t nor the prompt.
- ``StepValueNet`` (DPOK, Fan et al. 2023; google-research dpok/reward_model.py ValueMulti):
  V(x_t, c, j) = Linear(256, 1)(relu(CL3(relu(CL2(relu(CL1([flatten(x_t), c], j)), j)), j))),
  CL(x, j) = gamma_j * (W x + b) a linear layer gated per step j (gamma ~ U(0, 1), W Xavier-normal).

``CriticOptimizer`` holds a critic's AdamW, its gradient all-reduce across processes (the critic is
data-parallel, as accelerate makes it in the reference) and its own gradient clipping.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..rewards.clip import AestheticMLP


class EmbeddingCritic(AestheticMLP):
    """TDPO's critic: the aesthetic head's linear layers on an image embedding (see module docstring)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim)
        self.in_dim = in_dim
        for m in self.layers:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 1.0 / (in_dim + 1))
                nn.init.zeros_(m.bias)

    def hidden_layers(self) -> list[tuple[nn.Module, nn.Linear, nn.Linear]]:
        """(module whose output is a hidden layer, its Linear, the next Linear) for every hidden layer."""
        lin = [m for m in self.layers if isinstance(m, nn.Linear)]
        return [(lin[i], lin[i], lin[i + 1]) for i in range(len(lin) - 1)]


class ConditionalLinear(nn.Module):
    """gamma_j * (W x + b): a linear layer gated elementwise by a learned per-step vector (DPOK)."""

    def __init__(self, num_in: int, num_out: int, num_steps: int) -> None:
        super().__init__()
        self.lin = nn.Linear(num_in, num_out)
        self.embed = nn.Embedding(num_steps, num_out)
        nn.init.uniform_(self.embed.weight)
        nn.init.xavier_normal_(self.lin.weight)

    def forward(self, x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.embed(j) * self.lin(x)


class StepValueNet(nn.Module):
    """DPOK's value network V(x_t, c, j) on the flattened latent, a prompt embedding and the step index."""

    def __init__(self, latent_dim: int, cond_dim: int, num_steps: int, hidden: int = 256) -> None:
        super().__init__()
        self.in_dim = latent_dim + cond_dim
        self.lin1 = ConditionalLinear(self.in_dim, hidden, num_steps)
        self.lin2 = ConditionalLinear(hidden, hidden, num_steps)
        self.lin3 = ConditionalLinear(hidden, hidden, num_steps)
        self.lin4 = nn.Linear(hidden, 1)
        nn.init.xavier_normal_(self.lin4.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1).float(), cond.float()], dim=1)
        h = F.relu(self.lin1(h, j))
        h = F.relu(self.lin2(h, j))
        h = F.relu(self.lin3(h, j))
        return self.lin4(h).squeeze(-1)

    def hidden_layers(self) -> list[tuple[nn.Module, nn.Linear, nn.Linear]]:
        return [(self.lin1, self.lin1.lin, self.lin2.lin), (self.lin2, self.lin2.lin, self.lin3.lin), (self.lin3, self.lin3.lin, self.lin4)]


def prompt_embedding(cond) -> torch.Tensor:
    """One vector per sample from its conditioning: the pooled text embedding where the model has one
    (SDXL, SD3), else the token-mean of the hidden states (SD 1.x, the digits world's class embedding), over the
    unmasked tokens only where the conditioning has a padding mask (Qwen-Image)."""
    if cond.pooled is not None:
        return cond.pooled.float()
    if cond.mask is not None:
        m = cond.mask.to(cond.hidden.device).float()
        return (cond.hidden.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    return cond.hidden.float().mean(1)


class CriticOptimizer:
    """AdamW for a critic, with its gradients averaged over processes before each step and clipped alone."""

    def __init__(self, critic: nn.Module, *, lr: float, weight_decay: float = 0.0, max_grad_norm: float = 0.0) -> None:
        self.critic = critic
        self.params = [p for p in critic.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm

    def step(self, ctx) -> float:
        """All-reduce (mean) the gradients over processes, clip, step and zero them; returns the grad norm
        (NaN, and no step, when it is not finite)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if ctx is not None and ctx.active:
            import torch.distributed as dist

            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= ctx.world_size
            offset = 0
            for p, g in zip(self.params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        else:
            for p, g in zip(self.params, grads):
                p.grad = g
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf")))
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else float("nan")

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])


def clipped_value_loss(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO-style clipped value loss, mean over rows (TDPO's critic update):

        mean( max( (v - R)^2, (v_old + clamp(v - v_old, -clip, clip) - R)^2 ) )
    """
    v_clipped = v_old + (v - v_old).clamp(-clip, clip)
    return torch.maximum((v - target) ** 2, (v_clipped - target) ** 2).mean()


@torch.no_grad()
def reset_active_neurons(critic: nn.Module, opt: Optional[torch.optim.Optimizer], activations: list[torch.Tensor],
                         threshold: float, generator: torch.Generator) -> list[torch.Tensor]:
    """TDPO-R's reset of the critic's *active* neurons against primacy bias (Zhang et al. 2024;
    ZiyiZhang27/tdpo, neuron_recycler.py).

    For every hidden layer (``critic.hidden_layers()``), with a_k the layer's output of unit k on recent
    data (``activations``, one [N, units] tensor per hidden layer):

        score_k = mean_N relu(a_k) / (mean_k mean_N relu(a_k) + 1e-9),   reset unit k where score_k > threshold

    and for each reset unit: incoming weights ~ N(0, (1/(d+1))^2) with d the critic's input size, incoming
    bias 0, outgoing weights ~ N(0, (1/(d+1))^2), and the AdamW moments of those entries set to 0. Every
    other weight is untouched. Draws come from ``generator`` (on the CPU), the same on every process.
    Returns the boolean masks of reset units, one per hidden layer.
    """
    std = 1.0 / (critic.in_dim + 1)
    masks = []
    for (_, lin_in, lin_out), act in zip(critic.hidden_layers(), activations):
        score = act.float().clamp(min=0).mean(0)
        score = score / (score.mean() + 1e-9)
        mask = (score > threshold).to(lin_in.weight.device)
        masks.append(mask)
        fresh_in = torch.randn(lin_in.weight.shape, generator=generator) * std
        fresh_out = torch.randn(lin_out.weight.shape, generator=generator) * std
        m_cpu = mask.cpu()
        lin_in.weight[mask] = fresh_in[m_cpu].to(lin_in.weight)
        lin_in.bias[mask] = 0.0
        lin_out.weight[:, mask] = fresh_out[:, m_cpu].to(lin_out.weight)
        if opt is not None:
            for p, sel in ((lin_in.weight, (mask,)), (lin_in.bias, (mask,)), (lin_out.weight, (slice(None), mask))):
                st = opt.state.get(p, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        st[k][sel] = 0.0
    return masks


@torch.no_grad()
def hidden_activations(critic: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of every hidden layer of ``critic`` on ``inputs`` (eval mode), captured by forward hooks."""
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: acts.append(out.detach())) for m, _, _ in critic.hidden_layers()]
    was_training = critic.training
    critic.eval()
    try:
        critic(*inputs)
    finally:
        for h in hooks:
            h.remove()
        critic.train(was_training)
    return acts
