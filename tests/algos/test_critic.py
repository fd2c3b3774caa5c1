"""TDPO's temporal critic and TDPO-R's reset of active neurons."""
import torch

from diffrl_fast.algos.critic import CriticTrainer


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = torch.randn(n, 1, 32, generator=g)
    target = x.mean((1, 2, 3)) * 3 + cond.mean((1, 2))  # learnable from the inputs
    return x, t, cond, target


def test_critic_regression_reduces_error():
    x, t, cond, target = _data(256)
    ct = CriticTrainer(1, 32, lr=3e-3, epochs=1, batch_size=64, device="cpu", generator_seed=0)
    g = torch.Generator().manual_seed(1)
    first = ct.fit(x, t, cond, target, g)
    for _ in range(15):
        last = ct.fit(x, t, cond, target, g)
    assert last < 0.5 * first


def test_reset_active_neurons_refreshes_only_masked_weights():
    x, t, cond, target = _data()
    ct = CriticTrainer(1, 32, lr=1e-3, epochs=2, batch_size=32, device="cpu", generator_seed=0)
    ct.fit(x, t, cond, target, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in ct.critic.state_dict().items()}
    acts = ct.critic.hidden(x, t, cond).detach()
    mask = ct.reset_active_neurons(x, t, cond, threshold=1.0, generator=torch.Generator().manual_seed(5))
    score = acts.mean(0) / acts.mean(0).mean()
    assert torch.equal(mask, score > 1.0) and 0 < int(mask.sum()) < mask.numel()
    after = ct.critic.state_dict()
    # masked neurons: fresh incoming weights and bias, zero outgoing weights
    assert not torch.allclose(after["fc1.weight"][mask], before["fc1.weight"][mask])
    assert float(after["fc1.weight"][mask].abs().max()) <= 1 / ct.critic.fc1.in_features ** 0.5
    assert torch.all(after["fc2.weight"][:, mask] == 0)
    # everything else untouched
    assert torch.equal(after["fc1.weight"][~mask], before["fc1.weight"][~mask])
    assert torch.equal(after["fc1.bias"][~mask], before["fc1.bias"][~mask])
    assert torch.equal(after["fc2.weight"][:, ~mask], before["fc2.weight"][:, ~mask])
    for k in before:
        if not k.startswith(("fc1.", "fc2.weight")):
            assert torch.equal(after[k], before[k]), k
    # the optimiser forgets the reset entries' moments
    st = ct.optimizer.state[ct.critic.fc1.weight]
    assert torch.all(st["exp_avg"][mask] == 0) and not torch.all(st["exp_avg"][~mask] == 0)


def test_threshold_zero_resets_every_neuron_that_fired():
    x, t, cond, _ = _data()
    ct = CriticTrainer(1, 32, lr=1e-3, epochs=1, batch_size=32, device="cpu", generator_seed=0)
    acts = ct.critic.hidden(x, t, cond).detach()
    mask = ct.reset_active_neurons(x, t, cond, threshold=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, acts.mean(0) > 0)
