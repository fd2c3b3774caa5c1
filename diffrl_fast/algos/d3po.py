"""D3PO: direct preference optimisation on every denoising step (Yang et al. 2024, "Using Human Feedback
to Fine-tune Diffusion Models without Any Reward Model").

For two trajectories of the same prompt with the first preferred (w) over the second (l), each step t
is treated as a one-step DPO problem against the reference (pretrained) policy:

    h = log pi_theta(a_t | s_t) - log pi_ref(a_t | s_t)          (clamped to [log(1-c), log(1+c)])
    L = E_t[ -log sigmoid( beta (h_w - h_l) ) ]

K >= 2 samples per prompt are ranked and split into disjoint (winner, loser) pairs: best with worst,
second with second-worst, ... Ties are skipped. Preferences come from the reward ("AI feedback"), or
from a JSON file of human choices written by ``diffrl-fast label``: then the labelled images are
regenerated from their seeds with the reference policy each epoch, and the choices decide the pairs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..diffusion.recompute import step_logprob_of
from ..ops import dpo_step_loss
from .base import Algorithm, EpochData
from .common import group_ranking, policy_outputs, reference_logp


def pairs_from_ranking(ranking: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """[P, 2] (winner, loser) sample indices: best-with-worst pairs of each ranked group, ties dropped."""
    G = ranking.shape[1]
    pairs = torch.stack([torch.stack([ranking[:, i], ranking[:, G - 1 - i]], 1) for i in range(G // 2)], 1).reshape(-1, 2)
    keep = rewards[pairs[:, 0]] > rewards[pairs[:, 1]]
    return pairs[keep]


def read_preferences(path: str) -> dict:
    """The human-choice file of ``diffrl-fast label``, validated."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"d3po.preferences file {p} does not exist (write it with `diffrl-fast label`)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"d3po.preferences file {p} is not valid JSON: {exc}") from None
    items = data.get("items") if isinstance(data, dict) else None
    if not items:
        raise ValueError(f"d3po.preferences file {p} holds no labelled items")
    for i, it in enumerate(items):
        seeds = it.get("seeds")
        if not isinstance(it.get("prompt"), str) or not isinstance(seeds, list) or len(seeds) != 2 or it.get("choice") not in (0, 1):
            raise ValueError(f"d3po.preferences item {i} must be {{prompt: str, seeds: [int, int], choice: 0 or 1}}, got {it}")
    return data


class D3PO(Algorithm):
    name = "d3po"
    needs_reference = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        c = cfg.d3po
        self.labels = read_preferences(c.preferences) if c.preferences else None
        if self.labels is not None:
            mine = {"model": cfg.model.path, "num_steps": cfg.sample.num_steps, "guidance_scale": cfg.sample.guidance_scale,
                    "eta": cfg.sample.eta}
            differ = {k: (self.labels.get(k), v) for k, v in mine.items() if k in self.labels and self.labels[k] != v}
            if differ:
                raise ValueError(f"d3po.preferences {c.preferences} was labelled with other settings than this run "
                                 f"(file, config): {differ}; the images would not be the ones judged")
            self.sample_with_reference = True  # the human saw the pretrained model's images: regenerate exactly those

    def rollout_plan(self, trainer, epoch, batch, generator):
        if self.labels is None:
            return None
        items = self.labels["items"]
        per_batch = self.cfg.sample.batch_size // 2
        # one permutation per epoch, the same on every process; each process takes its own slice of it
        order = torch.randperm(len(items), generator=trainer.generator(epoch, 12)).tolist()
        start = (batch * trainer.ctx.world_size + trainer.ctx.rank) * per_batch
        chosen = [items[order[(start + i) % len(items)]] for i in range(per_batch)]
        prompts = [it["prompt"] for it in chosen for _ in range(2)]
        seeds = [int(s) for it in chosen for s in it["seeds"]]
        return prompts, seeds

    def prepare(self, trainer, traj, rewards):
        B = len(traj)
        if self.labels is not None:  # the preferred sample of each adjacent pair wins, whatever the reward says
            choice = torch.tensor([it["choice"] for it in self._batch_items(traj)])
            first = torch.arange(0, B, 2)
            pairs = torch.stack([first + choice, first + 1 - choice], 1)
        else:
            pairs = pairs_from_ranking(group_ranking(rewards, self.samples_per_prompt), rewards)
        partner = torch.full((B,), -1, dtype=torch.long)
        role = torch.zeros(B)
        partner[pairs[:, 0]], partner[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
        role[pairs[:, 0]], role[pairs[:, 1]] = 1.0, -1.0
        return EpochData(None, {"partner": partner, "role": role, "log": {"pairs": int(pairs.shape[0])}})

    def _batch_items(self, traj):
        lookup = {(it["prompt"], int(it["seeds"][0]), int(it["seeds"][1])): it for it in self.labels["items"]}
        seeds = traj.seeds.tolist()
        return [lookup[(traj.prompts[i], seeds[i], seeds[i + 1])] for i in range(0, len(traj), 2)]

    def chunk_loss(self, trainer, chunk, data, ctx=None):
        eps_u, eps_c = policy_outputs(trainer, chunk)
        logp = step_logprob_of(chunk, eps_u, eps_c)
        ref = reference_logp(trainer, chunk)
        idx = chunk.sample_idx.tolist()
        pos = {s: i for i, s in enumerate(idx)}
        role, partner = data.extra["role"], data.extra["partner"]
        win = [i for i, s in enumerate(idx) if role[s] > 0 and int(partner[s]) in pos]
        lose = [pos[int(partner[idx[i]])] for i in win]
        if not win:  # no pair in this chunk (ties): contributes nothing
            zero = 0.0 * logp.sum()
            return zero, {}
        w, l = torch.tensor(win), torch.tensor(lose)
        c = self.cfg.d3po
        out = dpo_step_loss(logp[w], ref[w], logp[l], ref[l], beta=c.beta, ratio_clip=c.ratio_clip)
        # rows outside pairs carry no loss: scale so the trainer's row weighting counts the paired rows only
        frac = 2 * w.numel() / len(idx)
        return out.loss * frac, {"accuracy": out.accuracy, "margin": out.margin}
