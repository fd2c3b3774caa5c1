"""Group helpers: GRPO advantages, rankings, D3PO pairs."""
import torch

from diffrl_fast.algos.common import group_ranking
from diffrl_fast.algos.d3po import pairs_from_ranking
from diffrl_fast.algos.grpo import grpo_advantages


def test_group_advantages_normalise_within_groups():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 20.0, 20.0])
    a = grpo_advantages(["x"] * 4 + ["y"] * 4, r, std="group")
    for g in a.reshape(2, 4):
        assert abs(float(g.mean())) < 1e-6 and abs(float(g.std(unbiased=False)) - 1) < 1e-3


def test_ranking_and_pairs():
    r = torch.tensor([0.1, 0.9, 0.5, 0.3, 2.0, 2.0])
    ranking = group_ranking(r[:4], 4)
    assert ranking.tolist() == [[1, 2, 3, 0]]
    pairs = pairs_from_ranking(ranking, r[:4])
    assert pairs.tolist() == [[1, 0], [2, 3]]  # best with worst, second with second-worst
    tie = pairs_from_ranking(group_ranking(r[4:], 2) + 0, r[4:])
    assert tie.numel() == 0  # equal rewards give no preference
