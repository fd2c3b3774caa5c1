"""Tree rollouts: the samples of a prompt share their trajectory up to branch steps and split there
(BranchGRPO, Li et al. 2025; TreeGRPO, 2025). A shared prefix is computed once.

A tree has L = factor^D leaves, D = len(branch_steps). Step j is the transition x_j -> x_{j+1}
(j = 0 the noisiest); at a branch step every node of the tree splits into ``factor`` children, each drawing
its own noise; at any other step a node keeps one child. So leaf l's state x_p is shared by the leaves that
agree with l on the first d(p) base-``factor`` digits (most significant first), d(p) = #{branch steps j < p}.

A node is named by its *representative*, the first leaf that holds its state:

    rep(l, p) = floor(l / f^(D - d(p))) * f^(D - d(p))

and the transition j of leaf l is *owned* by l when l = rep(l, j + 1): each distinct action x_j -> x_{j+1} of the
tree has exactly one owner, which is what training computes once (``owned_order``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeSpec:
    """The shape of every prompt's tree: branch steps (sorted step indices j in [0, T)) and the branching factor."""

    branch_steps: tuple[int, ...]
    factor: int = 2

    def __post_init__(self) -> None:
        steps = tuple(int(j) for j in self.branch_steps)
        if not steps:
            raise ValueError("a tree needs at least one branch step (sample.tree_branch_steps)")
        if list(steps) != sorted(set(steps)) or steps[0] < 0:
            raise ValueError(f"tree branch steps must be distinct, sorted and >= 0, got {list(self.branch_steps)}")
        if int(self.factor) < 2:
            raise ValueError(f"the tree's branching factor must be >= 2, got {self.factor}")
        object.__setattr__(self, "branch_steps", steps)
        object.__setattr__(self, "factor", int(self.factor))

    @property
    def depth(self) -> int:
        return len(self.branch_steps)

    @property
    def leaves(self) -> int:
        return self.factor ** self.depth

    def check(self, num_steps: int) -> None:
        if self.branch_steps[-1] >= num_steps:
            raise ValueError(f"tree branch steps {list(self.branch_steps)} must lie in [0, {num_steps}) "
                             f"(sample.num_steps = {num_steps})")

    def depth_at(self, num_steps: int) -> torch.Tensor:
        """[T + 1] d(p): the branch steps a leaf's state x_p has passed."""
        self.check(num_steps)
        p = torch.arange(num_steps + 1)
        return (torch.tensor(self.branch_steps)[None, :] < p[:, None]).sum(1)

    def reps(self, num_steps: int) -> torch.Tensor:
        """[L, T + 1] rep(l, p): the first leaf of the tree that shares leaf l's state x_p."""
        width = self.factor ** (self.depth - self.depth_at(num_steps))  # leaves under one node at x_p
        leaf = torch.arange(self.leaves)[:, None]
        return leaf // width[None, :] * width[None, :]

    def owner(self, num_steps: int) -> torch.Tensor:
        """[L, T] bool: leaf l owns transition j (it is the first leaf of the node its action x_{j+1} leads to)."""
        reps = self.reps(num_steps)
        return reps[:, 1:] == torch.arange(self.leaves)[:, None]

    def passes_per_tree(self, num_steps: int) -> int:
        """Denoiser evaluations (one per distinct state x_j, j < T) of one tree's rollout: sum_j f^d(j)."""
        return int((self.factor ** self.depth_at(num_steps)[:-1]).sum())

    def batch(self, n: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(reps [n, T + 1] as batch indices, owner [n, T]) of a batch of n samples made of adjacent trees."""
        L = self.leaves
        if n % L:
            raise ValueError(f"a batch of tree rollouts holds whole trees: {n} samples is not a multiple of the "
                             f"{L} leaves of a tree (sample.tree_branch_factor ^ len(sample.tree_branch_steps))")
        start = torch.arange(0, n, L)[:, None, None]
        reps = (self.reps(num_steps)[None] + start).reshape(n, num_steps + 1)
        return reps, self.owner(num_steps).repeat(n // L, 1)


def owned_order(order: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``order`` ([n, K] step indices per sample) with the steps a sample does not own replaced by -1 and the
    owned ones moved to the front (in their order): training then computes each distinct transition once."""
    own = owner.gather(1, order)
    key = (~own).to(torch.int64)  # owned first; a stable sort keeps the order among each
    perm = torch.sort(key, dim=1, stable=True).indices
    out = order.gather(1, perm)
    return torch.where(own.gather(1, perm), out, torch.full_like(out, -1))


TREE_FUSIONS = ("mean", "prob_weighted")
TREE_ADVANTAGE_NORMS = ("level", "leaves")


def node_advantages(spec: TreeSpec, rewards: torch.Tensor, num_steps: int, *, fusion: str = "mean",
                    edge_logp: torch.Tensor | None = None, alpha: float = 1.0, eps: float = 1e-8,
                    advantage_norm: str = "level") -> torch.Tensor:
    """BranchGRPO's per-transition advantages of a batch of adjacent trees, [B, T] (Li et al. 2025; reference:
    Fredreic1849/BranchGRPO, fastvideo/train_branchgrpo_flux.py: compute_node_rewards_from_leaves,
    compute_hierarchical_advantages_by_depth).

    Node rewards come from the leaves' rewards r (``rewards`` [B]), per ``fusion``:

        mean:          R(node) = mean of r over the node's leaves                          (the reference's default)
        prob_weighted: R(node) = sum_c softmax_c(alpha log p_c) R(c), bottom-up over its children c, log p_c the
                       log-prob of the action into c (``edge_logp`` [B, T], the rollout's); one child: R(c)

    then normalised per tree, by ``advantage_norm``:

        level  (BranchGRPO's): per level p (the state x_p; every step is a level), over the tree's N_p nodes there,
               A(node) = (R(node) - mean_p R) / (std_p R + eps),   std unbiased (N_p - 1), eps = 1e-8;
               A = 0 where N_p = 1 (the root) or std_p R < 1e-6.
        leaves (a named difference): by the statistics of the tree's leaves at every level,
               A(node) = (R(node) - mean_leaves r) / (std_leaves r + eps),   A = 0 where std_leaves r < 1e-6,
               which with the mean fusion is the mean of the GRPO advantages of the node's leaves: an interior
               transition's advantage shrinks with the difference its subtree makes, where the level statistics
               give every level unit spread (two nodes at a level always get +-1/sqrt(2)). At the leaves both agree.

    Transition j of leaf l (x_j -> x_{j+1}) takes the advantage of the node its action leads to, the one at x_{j+1}:
    the mean fusion makes a node's reward its subtree's mean outcome, and the level normalisation compares siblings
    and cousins that share everything up to their last branch.
    """
    if fusion not in TREE_FUSIONS:
        raise ValueError(f"tree reward fusion must be one of {TREE_FUSIONS}, got {fusion!r}")
    if advantage_norm not in TREE_ADVANTAGE_NORMS:
        raise ValueError(f"tree advantage normalisation must be one of {TREE_ADVANTAGE_NORMS}, got {advantage_norm!r}")
    B, T = rewards.numel(), num_steps
    reps, owner = spec.batch(B, T)
    r = rewards.to(torch.float64).reshape(B)
    levels = torch.empty((B, T + 1), dtype=torch.float64)  # R of the node holding leaf l's state x_p
    levels[:, T] = r
    if fusion == "mean":
        for p in range(T):
            key = reps[:, p]
            total = torch.zeros(B, dtype=torch.float64).index_add_(0, key, r)
            count = torch.zeros(B, dtype=torch.float64).index_add_(0, key, torch.ones(B, dtype=torch.float64))
            levels[:, p] = (total / count.clamp_min(1))[key]
    else:
        if edge_logp is None or tuple(edge_logp.shape) != (B, T):
            raise ValueError(f"the prob_weighted fusion needs the rollout's log-probs, [B={B}, T={T}]")
        lp = edge_logp.detach().to("cpu", torch.float64)
        for p in range(T - 1, -1, -1):  # children of the nodes at x_p: the owners of transition p
            own = torch.nonzero(owner[:, p]).flatten()
            parent = reps[own, p]
            z = alpha * lp[own, p]
            zmax = torch.full((B,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, parent, z, "amax")
            w = torch.exp(z - zmax[parent])
            norm = torch.zeros(B, dtype=torch.float64).index_add_(0, parent, w)
            value = torch.zeros(B, dtype=torch.float64).index_add_(0, parent, w * levels[own, p + 1])
            levels[:, p] = (value / norm.clamp_min(1e-300))[reps[:, p]]
    adv = torch.zeros((B, T), dtype=torch.float64)
    L = spec.leaves
    leaf_vals = r.reshape(-1, L)
    leaf_mean, leaf_std = leaf_vals.mean(1, keepdim=True), leaf_vals.std(1, unbiased=True, keepdim=True)
    for p in range(1, T + 1):
        first = reps[:, p] == torch.arange(B)  # one row per node
        vals = levels[:, p].reshape(-1, L)
        mask = first.reshape(-1, L)
        n = int(mask[0].sum())  # the same in every tree
        if n < 2:
            continue
        if advantage_norm == "level":
            node_vals = vals[mask].reshape(-1, n)
            mean = node_vals.mean(1, keepdim=True)
            std = node_vals.std(1, unbiased=True, keepdim=True)
        else:
            mean, std = leaf_mean, leaf_std
        a = torch.where(std < 1e-6, torch.zeros_like(vals), (vals - mean) / (std + eps))
        adv[:, p - 1] = a.reshape(-1)
    return adv.to(torch.float32)


PRUNE_WIDTH_MODES = (0, 1, 2)


def prune_depths(depths: list[int], epoch: int, slide_every: int, branch_steps: tuple[int, ...]) -> list[int]:
    """BranchGRPO's depth pruning window at ``epoch`` (its training step; reference: train_branchgrpo_flux.py, the
    ``depth_pruning`` block): the child depths d (transition j leads to depth d = j + 1) whose transitions are not
    trained. With ``slide_every`` > 0 the window slides toward the root by one depth every ``slide_every`` epochs,

        shift = min(epoch // slide_every, min(depths) - max(branch_steps)),  depths - shift,

    so that its shallowest depth stops at the last branch step's (the reference's default stop depth)."""
    base = sorted(int(d) for d in depths)
    if not base or slide_every <= 0:
        return base
    shift = min(epoch // slide_every, max(0, base[0] - max(branch_steps)))
    return [d - shift for d in base]


def prune_mask(spec: TreeSpec, adv: torch.Tensor, trained: torch.Tensor, *, width_mode: int = 0, width_ratio: float = 0.5,
               depths: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """[B, T] bool: the transitions of a batch of adjacent trees that training keeps after BranchGRPO's pruning
    (Li et al. 2025; reference: Fredreic1849/BranchGRPO, fastvideo/train_branchgrpo_flux.py, the depth and width
    pruning after ``collect_all_transitions``). ``adv`` [B, T] holds the node advantages (``node_advantages``),
    ``trained`` the step indices training uses (the window), ``depths`` the child depths to drop (``prune_depths``).

    The candidates are the owned transitions at trained steps that survive depth pruning. Width pruning acts on
    those after the last split, j > max(branch_steps), where each leaf's chain is one branch:

        mode 1: per leaf, keep max(1, int(n_leaf x ratio)) of its n_leaf candidates, the largest advantages first
                (a chain's advantages are equal, so its earliest steps: the reference's stable sort, depth-first order);
        mode 2: over the batch's candidates, keep = max(2, int(n x ratio)): the keep // 2 largest advantages and the
                keep - keep // 2 smallest (ties in the reference's depth-first order: tree, leaf, step).

    Transitions at or before the last split are never width-pruned; advantages are those of the full tree."""
    B, T = adv.shape
    owner = spec.batch(B, T)[1]
    cand = torch.zeros((B, T), dtype=torch.bool)
    cand[:, trained] = True
    cand &= owner
    for d in depths:
        if 1 <= d <= T:
            cand[:, d - 1] = False
    keep = cand.clone()
    if width_mode == 0:
        return keep
    if width_mode not in PRUNE_WIDTH_MODES:
        raise ValueError(f"tree width pruning mode must be one of {PRUNE_WIDTH_MODES}, got {width_mode}")
    last = torch.zeros(T, dtype=torch.bool)
    last[max(spec.branch_steps) + 1:] = True
    tail = cand & last[None, :]
    if not bool(tail.any()):
        return keep
    keep &= ~tail
    a = adv.detach().to("cpu", torch.float64)
    if width_mode == 1:
        for b in range(B):
            steps = torch.nonzero(tail[b]).flatten()
            if steps.numel():
                n = max(1, int(steps.numel() * width_ratio))
                order = torch.sort(-a[b, steps], stable=True).indices  # largest first, earlier step on ties
                keep[b, steps[order[:n]]] = True
    else:
        rows, cols = torch.nonzero(tail, as_tuple=True)  # row-major: the reference's depth-first order
        n = max(2, int(rows.numel() * width_ratio))
        order = torch.sort(-a[rows, cols], stable=True).indices
        best, worst = n // 2, n - n // 2  # n >= 2: at least one of each
        chosen = torch.cat([order[:best], order[order.numel() - worst:]])
        keep[rows[chosen], cols[chosen]] = True
    return keep
