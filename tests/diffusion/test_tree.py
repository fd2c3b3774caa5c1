"""Tree rollouts (BranchGRPO): the tree's shape, its rollouts on the flow-digits world (shared prefixes computed
once, a first leaf that is an ordinary rollout, exact recompute), and its node advantages against a transcription
of BranchGRPO's tree walk (tests/reference/algorithms.py)."""
import pytest
import torch

from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.diffusion.tree import TreeSpec, node_advantages, owned_order, prune_depths, prune_mask
from tests.reference.algorithms import branchgrpo_edges, branchgrpo_pruned

T = 6
TREE = TreeSpec((1, 3), 2)  # 4 leaves: split after a shared first step, and again at step 3


def test_tree_shape():
    assert TREE.leaves == 4 and TREE.depth_at(T).tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert TREE.reps(T)[3].tolist() == [0, 0, 2, 2, 3, 3, 3]
    # every distinct action has one owner: 1 + 2 + 2 + 4 + 4 + 4 transitions (a branch step's children differ);
    # a denoiser pass per distinct state x_0 .. x_5: 1 + 1 + 2 + 2 + 4 + 4
    assert int(TREE.owner(T).sum()) == 17 and TREE.passes_per_tree(T) == 14
    reps, owner = TREE.batch(8, T)
    assert reps[4:].tolist() == (TREE.reps(T) + 4).tolist() and owner.shape == (8, T)
    with pytest.raises(ValueError, match="whole trees"):
        TREE.batch(6, T)
    with pytest.raises(ValueError, match="sorted"):
        TreeSpec((3, 1))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        TREE.check(3)


def test_owned_order_keeps_each_transition_once():
    order = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    out = owned_order(order, TREE.owner(T))
    rows = {(b, int(j)) for b in range(4) for j in out[b] if j >= 0}
    assert rows == {(b, j) for b in range(4) for j in range(T) if TREE.owner(T)[b, j]}
    for b in range(4):  # owned first, in the given order, then padding
        kept = [int(j) for j in order[b] if TREE.owner(T)[b, j]]
        assert out[b].tolist() == kept + [-1] * (T - len(kept))


@pytest.mark.parametrize("fusion", ["mean", "prob_weighted"])
def test_node_advantages_match_branchgrpo(fusion):
    tree = TreeSpec((0, 2, 3), 2)
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(16, generator=g, dtype=torch.float64)
    logp = torch.randn(16, T, generator=g, dtype=torch.float64)
    adv = node_advantages(tree, rewards, T, fusion=fusion, edge_logp=logp)
    owner, reps = tree.owner(T), tree.reps(T)
    for t in range(2):  # two trees in the batch, each on its own
        r, lp = rewards[8 * t:8 * t + 8], logp[8 * t:8 * t + 8]
        edges = branchgrpo_edges(r.tolist(), {0, 2, 3}, T, 2, fusion, lp.tolist())
        assert set(edges) == {(l, j) for l in range(8) for j in range(T) if owner[l, j]}
        for l in range(8):
            for j in range(T):  # every leaf reads its node's action's advantage
                want = edges[(int(reps[l, j + 1]), j)]
                assert abs(float(adv[8 * t + l, j]) - want) < 1e-5, (fusion, t, l, j)
    assert abs(float(adv[0, 0]) ** 2 - 0.5) < 1e-6  # two nodes at a level: +-1/sqrt(2)


def test_leaf_normalised_advantages_are_the_mean_leaf_advantage_below():
    """norm=leaves: transition j of leaf l gets the mean over the leaves under the node it leads to of
    (r - mean of the tree's leaves) / std of the tree's leaves (unbiased); at the last level it equals BranchGRPO's."""
    tree = TreeSpec((0, 2, 3), 2)
    rewards = torch.randn(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    adv = node_advantages(tree, rewards, T, advantage_norm="leaves")
    level = node_advantages(tree, rewards, T)
    reps = tree.reps(T)
    for t in range(2):
        r = rewards[8 * t:8 * t + 8]
        a_leaf = (r - r.mean()) / (r.std() + 1e-8)
        for l in range(8):
            for j in range(T):
                below = [k for k in range(8) if int(reps[k, j + 1]) == int(reps[l, j + 1])]
                want = 0.0 if len(below) == 8 else float(a_leaf[below].mean())  # the root's level: one node, no advantage
                assert abs(float(adv[8 * t + l, j]) - want) < 1e-5, (t, l, j)
    last = tree.branch_steps[-1]
    assert torch.allclose(adv[:, last:], level[:, last:], atol=1e-6)  # from the last split on, each node is one leaf
    assert not torch.allclose(adv[:, 0], level[:, 0])  # the first split: no longer +-1/sqrt(2)
    assert torch.equal(node_advantages(TREE, torch.ones(4), T, advantage_norm="leaves"), torch.zeros(4, T))
    with pytest.raises(ValueError, match="normalisation"):
        node_advantages(TREE, torch.ones(4), T, advantage_norm="depth")


@pytest.mark.parametrize("width_mode, depths, trained", [(1, [], range(6)), (2, [], range(6)), (2, [2], range(4)),
                                                         (0, [1, 5], range(6)), (1, [6], range(2, 6))])
def test_pruning_matches_branchgrpo(width_mode, depths, trained):
    T6, tree = 6, TreeSpec((0, 1), 2)  # last split at step 1: steps 2-5 are each leaf's chain
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)  # three trees of four leaves
    rewards[5] = rewards[6]  # a tie, broken in the reference's depth-first order
    adv = node_advantages(tree, rewards, T6)
    keep = prune_mask(tree, adv, torch.tensor(list(trained)), width_mode=width_mode, width_ratio=0.5, depths=depths)
    want = branchgrpo_pruned([rewards[4 * t:4 * t + 4].tolist() for t in range(3)], (0, 1), T6, set(trained), depths,
                             width_mode, 0.5)
    got = {(b // 4, b % 4, j) for b, j in torch.nonzero(keep).tolist()}
    assert got == want
    if width_mode:
        assert len(got) < len(branchgrpo_pruned([rewards[4 * t:4 * t + 4].tolist() for t in range(3)], (0, 1), T6,
                                                set(trained), depths, 0, 0.5))  # it prunes something


def test_depth_pruning_window_slides_to_the_last_split():
    assert prune_depths([8, 9], 0, 0, (0, 3)) == [8, 9]  # fixed
    assert prune_depths([8, 9], 0, 2, (0, 3)) == [8, 9]
    assert prune_depths([8, 9], 5, 2, (0, 3)) == [6, 7]  # one depth per 2 epochs
    assert prune_depths([8, 9], 100, 2, (0, 3)) == [3, 4]  # stops where its shallowest depth meets the last split


def test_tied_rewards_give_zero_advantage():
    adv = node_advantages(TREE, torch.ones(4), T)
    assert torch.equal(adv, torch.zeros(4, T))


@pytest.fixture(scope="module")
def flow_model():
    from diffrl_fast.models import load_model

    return load_model("flow-digits")


def test_tree_rollout_shares_prefixes_and_computes_them_once(flow_model):
    model = flow_model
    prompts = ["3 left of 8"] * 4 + ["7"] * 4
    seeds = list(range(100, 108))
    before = model.denoiser_passes
    traj = sample_trajectories(model, prompts, num_steps=T, guidance_scale=1.0, seeds=seeds, tree=TREE, keep_means=True)
    assert model.denoiser_passes - before == 2 * TREE.passes_per_tree(T)  # 28 rows, not 8 x 6 = 48
    lat = traj.latents
    reps = TREE.reps(T)
    for b in range(8):
        for p in range(T + 1):
            r = 4 * (b // 4) + int(reps[b % 4, p])
            assert torch.equal(lat[b, p], lat[r, p])  # a shared state is the same tensor value
    assert not torch.equal(lat[0, 2], lat[2, 2]) and torch.equal(lat[0, 1], lat[3, 1])
    # the first leaf owns every transition: it is the ordinary rollout of its seed
    plain = sample_trajectories(model, prompts[:1] + prompts[4:5], num_steps=T, guidance_scale=1.0, seeds=[100, 104], keep_means=True)
    assert torch.allclose(lat[[0, 4]], plain.latents, atol=1e-6) and torch.allclose(traj.log_probs[[0, 4]], plain.log_probs, atol=1e-6)
    assert torch.allclose(traj.means[[0, 4]], plain.means, atol=1e-6)  # the step means GRPO-Guard re-centres on
    for b in range(8):  # a leaf's step mean is its node's, from the state x_j it shares
        for j in range(T):
            assert torch.equal(traj.means[b, j], traj.means[4 * (b // 4) + int(reps[b % 4, j]), j])
    # training's recompute agrees with every leaf's recorded log-probs, the shared ones included
    assert parity_report(model, traj, batch_size=4, chunk_size=3)["worst"] <= 1e-5
    with pytest.raises(ValueError, match="whole trees"):
        traj.index(torch.tensor([1, 2, 3, 4]))
    assert traj.index(torch.arange(4, 8)).prompts == ["7"] * 4


def test_split_noise_scale_widens_branch_steps_only(flow_model):
    model = flow_model
    args = dict(num_steps=T, guidance_scale=1.0, seeds=list(range(4)), tree=TREE)
    a = sample_trajectories(model, ["5"] * 4, **args)
    b = sample_trajectories(model, ["5"] * 4, split_noise_scale=4.0, **args)
    assert torch.equal(a.latents[:, :2], b.latents[:, :2])  # before the first branch step: the same
    # the leaf owning branch step 1's second child: its step-1 noise is 4x as far from the shared mean
    da, db = a.latents[2, 2] - a.latents[0, 2], b.latents[2, 2] - b.latents[0, 2]
    assert float(db.norm() / da.norm()) == pytest.approx(4.0, rel=0.05)
