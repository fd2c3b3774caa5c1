"""``diffrl-fast eval``: score a trained run (or a base model) with one or more rewards over N fixed seeds."""
from __future__ import annotations

import json

from ..cli import ArgumentParser, UsageError
from ..rewards import RewardError, check_rewards, get_reward
from .sample import add_policy_args, load_policy, sample_images


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast eval", description=__doc__)
    add_policy_args(ap)
    ap.set_defaults(n=256)
    ap.add_argument("--reward", action="append", required=True, help="reward name or package.module:function (repeatable)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    try:
        fns = {name: get_reward(name) for name in args.reward}
    except RewardError as exc:
        raise UsageError(str(exc)) from None
    model, defaults = load_policy(args)
    traj = sample_images(model, defaults, args)
    results = {}
    for name, fn in fns.items():
        rewards = check_rewards(name, fn(traj.images, traj.prompts, traj.metadata)[0], len(traj))
        results[name] = {"mean": float(rewards.mean()), "std": float(rewards.std(unbiased=False)), "n": len(traj)}
        print(f"{name}: {results[name]['mean']:+.4f} ± {results[name]['std']:.4f} over {len(traj)} samples (seeds {args.seed}..{args.seed + len(traj) - 1})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.run or args.model, "rewards": results}, f, indent=1)
    return 0
