"""The dense-reward view with K > 2 samples per prompt: our loss and policy gradient of one optimiser step equal a
second, independent float64 transcription of the reference's Plackett-Luce (ListMLE) objective.

Reference: Shentao-YANG/Dense_Reward_T2I (commit 863a383)
  preference_based_policy_learner.py ``get_pl_loss_logit`` (l. 245-316): one set of step indices drawn with
  replacement from Cat(gamma^t / sum gamma^t) (l. 252-256), shared by the tuple's trajectories; per trajectory
  logit = pl_loss_temp * sum_n clip(log pi_theta - log pi_init, -c, c) / N (l. 295, 306, 309).
  ``calculate_pl_loss_and_backward`` (l. 318-347): loss = listMLELoss(logits, rewards) / (num_combs * grad. accum.).
  reward_loss.py ``listMLELoss`` (l. 6-33): rank by reward (descending; ties broken at random), u -= max u,
      loss = mean over groups of sum_{i=1..K} [ log(sum_{j >= i} exp(u_j) + 1e-10) - u_i ]
  i.e. the i = K term is included (it is log(1 + 1e-10 e^{-u_K}) ~ 1e-10: zero for all purposes) and every log
  carries a 1e-10.

The oracle below is written from those lines (nothing from diffrl_fast, nor from the pairwise ``dense`` oracle of
tests/reference/algorithms.py); it is also checked against the textbook form without the 1e-10 and the i = K term,
and, for K = 2, against that pairwise oracle.
"""
from __future__ import annotations

import pytest
import torch

from tests.algos.test_reference_objectives import REL, Step, assert_close
from tests.reference import algorithms as ref
from tests.reference.algorithms import F64, row_logp

C, CLIP, N = 12.5, 5e-4, 3  # several prompts: the reference's single_flag = 0 values of C and c; N = 3 draws
EPS = 1e-10  # reward_loss.py's DEFAULT_EPS


def group_logits(batch, sampler, eps, ref_eps, draws, *, group, temperature, log_ratio_clip):
    """Per group of ``group`` adjacent samples: the samples ranked best first by reward and their logits
    u_k = C * sum_n clamp(log pi_theta - log pi_init, -c, c) / N over the group's drawn steps ``draws[g]``."""
    out = []
    for gi, g0 in enumerate(range(0, len(batch.prompts), group)):
        members = list(range(g0, g0 + group))
        ranked = sorted(members, key=lambda s: float(batch.rewards[s]), reverse=True)
        logits = []
        for s in ranked:
            log_diff = torch.zeros((), dtype=F64)
            for j in draws[gi]:
                lp = row_logp(batch, sampler, eps, s, j)[0]
                with torch.no_grad():
                    lp_init = row_logp(batch, sampler, ref_eps, s, j)[0]
                log_diff = log_diff + torch.clamp(lp - lp_init, -log_ratio_clip, log_ratio_clip) / len(draws[gi])
            logits.append(temperature * log_diff)
        out.append((ranked, torch.stack(logits)))
    return out


def listmle_reference(u):
    """reward_loss.py listMLELoss for one group's logits u [K], best first: all K terms, 1e-10 inside the log."""
    z = u - u.max()
    tail = torch.flip(torch.cumsum(torch.flip(torch.exp(z), [0]), 0), [0])  # tail[i] = sum_{j >= i} exp(z_j)
    return (torch.log(tail + EPS) - z).sum()


def listmle_textbook(u):
    """-sum_{i=1}^{K-1} log( exp(u_i) / sum_{j >= i} exp(u_j) )."""
    K = u.numel()
    return -sum(torch.log(torch.exp(u[i]) / torch.exp(u[i:]).sum()) for i in range(K - 1))


CASES = {  # K, sample batch, train batch, gradient accumulation (one optimiser step each)
    "K2": (2, 8, 8, 1),
    "K3": (3, 6, 6, 1),
    "K4": (4, 8, 8, 1),
    "K4-accumulated": (4, 8, 4, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dense_plackett_luce(tmp_path, case):
    K, bs, tbs, acc = CASES[case]
    s = Step(tmp_path, "dense", f"dense.samples_per_prompt={K}", f"dense.num_timesteps={N}", f"sample.batch_size={bs}",
             f"train.batch_size={tbs}", f"train.gradient_accumulation_steps={acc}", "train.learning_rate=1e-3",
             "sample.num_steps=4", perturb=0.0005)
    d = s.cfg.dense
    assert (d.temperature, d.log_ratio_clip, d.timestep_sampling, d.gamma) == (C, CLIP, "discounted", 0.9)
    n_groups = bs // K
    order = s.orders[0]
    assert order.shape == (bs, N)
    for g in range(n_groups):  # one draw of steps per group, shared by its K samples
        assert bool((order[g * K:(g + 1) * K] == order[g * K]).all())
    draws = [order[g * K].tolist() for g in range(n_groups)]
    for g in range(n_groups):
        assert len(set(s.traj.prompts[g * K:(g + 1) * K])) == 1  # a group is one prompt's samples
        r = s.rewards[g * K:(g + 1) * K]
        assert len(set(r.tolist())) == K  # no ties: the reference's random tie-break does not matter

    # the clamp bites on some of the drawn (sample, step) rows only
    h = s.log_ratios(range(4)).abs().reshape(bs, 4)
    drawn = torch.stack([h[b, draws[b // K]] for b in range(bs)])
    assert 0 < int((drawn < CLIP).sum()) < drawn.numel(), drawn

    leaves, eps, ref_eps = s.eps_fns()
    b, sm = s.batch(), s.sampler()
    groups = group_logits(b, sm, eps, ref_eps, draws, group=K, temperature=C, log_ratio_clip=CLIP)
    if K > 2:  # the ranking is not the sampling order somewhere: the sort is exercised
        assert any(ranked != sorted(ranked) for ranked, _ in groups)
    loss = torch.stack([listmle_reference(u) for _, u in groups]).mean()  # mean over groups (and minibatches)
    textbook = torch.stack([listmle_textbook(u) for _, u in groups]).mean()
    assert abs(float(loss.detach() - textbook.detach())) < 1e-8, (float(loss.detach()), float(textbook.detach()))

    loss.backward()
    theirs = {n: p.grad.clone() for n, p in leaves.items()}
    value = float(loss.detach())
    assert abs(float(s.stats["loss"]) - value) <= REL * abs(value), (float(s.stats["loss"]), value)
    assert_close(s.grads[0], theirs, "policy gradient")

    if K == 2:  # the pairwise oracle of tests/reference/algorithms.py agrees with this transcription
        leaves2, eps2, ref_eps2 = s.eps_fns()
        pairwise = ref.dense(b, sm, eps2, ref_eps2, draws, temperature=C, log_ratio_clip=CLIP)
        pairwise.backward()
        assert abs(float(pairwise.detach()) - value) <= 1e-9 * abs(value)
        assert_close({n: p.grad for n, p in leaves2.items()}, theirs, "pairwise oracle vs Plackett-Luce", rel=1e-9)
