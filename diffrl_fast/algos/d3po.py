"""D3PO: direct preference optimisation on every denoising step (Yang et al. 2024, "Using Human Feedback
to Fine-tune Diffusion Models without Any Reward Model"; reference: yk7333/d3po, scripts/rm/train_d3po.py
(reward feedback), scripts/train.py (human feedback), scripts/sample.py, config/base.py).

For two trajectories of the same prompt, sampled from the same initial noise x_T, with the first preferred
(w) over the second (l), each step t is a one-step DPO problem against the reference (pretrained) policy:

    h = log clamp(pi_theta(a_t | s_t) / pi_ref(a_t | s_t), 1 - c, 1 + c)       (c = 0.1)
    L = E_{pairs, t}[ -log sigmoid( beta (h_w - h_l) ) ]                     (beta = 0.1)

with log-probs averaged over latent elements. K >= 2 samples of a prompt share x_T; every non-tied pair
is used (the reference's human-feedback script; ``d3po.pairs=disjoint`` pairs best with worst, second with
second-worst, ...), each with its own optimiser step over all its trained steps, as the reference's loop takes
them (``d3po.step_per_pair=false``: a minibatch's pairs averaged into one step). Tied pairs carry no gradient and
are skipped. Preferences come from the reward
("AI feedback"), or from a JSON file of human choices written by ``diffrl-fast label``: then the labelled
images are regenerated from their seeds with the reference policy each epoch, and the choices decide.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..diffusion.recompute import step_logprob_of
from ..ops import dpo_step_loss
from .base import Algorithm, EpochData
from .common import group_ranking, policy_outputs, reference_logp


def pairs_from_ranking(ranking: torch.Tensor, rewards: torch.Tensor, mode: str = "disjoint") -> torch.Tensor:
    """[P, 2] (winner, loser) sample indices of each ranked group (best first), ties dropped: every pair
    (i, j), i ranked above j, with ``mode="all"``; best with worst, second with second-worst, ... with
    ``"disjoint"``."""
    G = ranking.shape[1]
    if mode == "all":
        idx = [(i, k) for i in range(G) for k in range(i + 1, G)]
    else:
        idx = [(i, G - 1 - i) for i in range(G // 2)]
    pairs = torch.stack([torch.stack([ranking[:, i], ranking[:, k]], 1) for i, k in idx], 1).reshape(-1, 2)
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
    reference = "yk7333/d3po: scripts/rm/train_d3po.py, scripts/train.py, scripts/sample.py, config/base.py"
    needs_reference = True

    @classmethod
    def group_size(cls, cfg):
        return 2 if cfg.d3po.preferences else cfg.d3po.samples_per_prompt

    @classmethod
    def reference_defaults(cls, n_prompts):
        # 10 pairs per rollout batch, 2 batches per epoch, one optimiser step per pair over all 20 steps
        return {"train.learning_rate": 3e-5, "sample.num_steps": 20, "sample.batch_size": 20, "sample.num_batches_per_epoch": 2,
                "train.batch_size": 2, "train.gradient_accumulation_steps": 1, "num_epochs": 400}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        c = cfg.d3po
        self.shares_initial_noise = c.shared_initial_noise
        self.labels = read_preferences(c.preferences) if c.preferences else None
        if self.labels is not None:
            mine = {"model": cfg.model.path, "num_steps": cfg.sample.num_steps, "guidance_scale": cfg.sample.guidance_scale,
                    "eta": cfg.sample.eta}
            differ = {k: (self.labels.get(k), v) for k, v in mine.items() if k in self.labels and self.labels[k] != v}
            shared = bool(self.labels.get("shared_initial_noise", False))  # files of older versions: one x_T per image
            if shared != c.shared_initial_noise:
                differ["shared_initial_noise"] = (shared, c.shared_initial_noise)
            if differ:
                raise ValueError(f"d3po.preferences {c.preferences} was labelled with other settings than this run "
                                 f"(file, config): {differ}; the images would not be the ones judged")
            self.sample_with_reference = True  # the human saw the pretrained model's images: regenerate exactly those

    def rollout_plan(self, run, epoch, batch, generator):
        if self.labels is None:
            return None
        items = self.labels["items"]
        per_batch = self.cfg.sample.batch_size // 2
        # one permutation per epoch, the same on every process; each process takes its own slice of it
        order = torch.randperm(len(items), generator=run.generator(epoch, 12)).tolist()
        start = (batch * run.dist.world_size + run.dist.rank) * per_batch
        chosen = [items[order[(start + i) % len(items)]] for i in range(per_batch)]
        prompts = [it["prompt"] for it in chosen for _ in range(2)]
        seeds = [int(s) for it in chosen for s in it["seeds"]]
        return prompts, seeds

    def prepare(self, run, traj, rewards):
        B = len(traj)
        if self.labels is not None:  # the preferred sample of each adjacent pair wins, whatever the reward says
            choice = torch.tensor([it["choice"] for it in self._batch_items(traj)])
            first = torch.arange(0, B, 2)
            pairs = torch.stack([first + choice, first + 1 - choice], 1)
        else:
            pairs = pairs_from_ranking(group_ranking(rewards, self.samples_per_prompt), rewards, self.cfg.d3po.pairs)
        # pairs per sample over all processes: each chunk's loss is scaled by its own pair density over this,
        # so the optimiser step's gradient is the mean over its (pair, step) terms
        counts = run.dist.all_gather_object((int(pairs.shape[0]), B)) if run.dist.active else [(int(pairs.shape[0]), B)]
        density = sum(p for p, _ in counts) / max(1, sum(n for _, n in counts))
        return EpochData(None, {"pairs": pairs, "density": density, "log": {"pairs": int(pairs.shape[0])}})

    def per_pair(self) -> bool:
        """One minibatch (and with the reference's accumulation of 1, one optimiser step) per pair: K > 2 samples
        per prompt from the reward, with d3po.step_per_pair."""
        return self.cfg.d3po.step_per_pair and self.labels is None and self.samples_per_prompt > 2

    def setup(self, run) -> None:
        if self.per_pair() and run.dist.active:
            raise ValueError("d3po.step_per_pair takes one optimiser step per non-tied pair, and the pairs per process "
                             "differ with the ties: with several processes set d3po.step_per_pair=false")

    def minibatches(self, order, data):
        if not self.per_pair():
            return super().minibatches(order, data)
        # the reference's loop: prompt groups in the epoch's order, then each pair of the group in turn
        G, pairs = self.samples_per_prompt, data.extra["pairs"]
        by_group: dict[int, list[torch.Tensor]] = {}
        for pair in pairs:
            by_group.setdefault(int(pair[0]) // G, []).append(pair)
        groups = list(dict.fromkeys(int(i) // G for i in order.tolist()))
        return [pair for g in groups for pair in by_group.get(g, [])]

    def _batch_items(self, traj):
        lookup = {(it["prompt"], int(it["seeds"][0]), int(it["seeds"][1])): it for it in self.labels["items"]}
        seeds = traj.seeds.tolist()
        return [lookup[(traj.prompts[i], seeds[i], seeds[i + 1])] for i in range(0, len(traj), 2)]

    def chunk_loss(self, run, chunk, data, ctx=None):
        eps_u, eps_c = policy_outputs(run, chunk)
        logp = step_logprob_of(chunk, eps_u, eps_c)
        ref = reference_logp(run, chunk)
        pos = {s: i for i, s in enumerate(chunk.sample_idx.tolist())}
        inside = [(pos[int(w)], pos[int(l)]) for w, l in data.extra["pairs"].tolist() if int(w) in pos and int(l) in pos]
        if not inside or data.extra["density"] == 0:  # no pair in this chunk (ties): contributes nothing
            return 0.0 * logp.sum(), {}
        w, l = torch.tensor(inside).unbind(1)
        c = self.cfg.d3po
        out = dpo_step_loss(logp[w], ref[w], logp[l], ref[l], beta=c.beta, ratio_clip=c.ratio_clip)
        # the trainer weights a chunk by its rows; its loss is a mean over pair-steps: rescale by pairs per row
        # (a minibatch of one pair: its rows are its steps, no rescaling)
        scale = 1.0 if self.per_pair() else len(inside) / len(pos) / data.extra["density"]
        return out.loss * scale, {"accuracy": out.accuracy, "margin": out.margin}
