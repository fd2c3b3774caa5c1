"""``diffrl-fast eval``: score a trained run (or a base model) with one or more rewards over N fixed seeds.

Each ``--reward`` names a registered reward, a ``package.module:function`` or a reward server's ``http://HOST:PORT``;
a ``--kwargs JSON`` right after it gives that reward's keyword arguments (the reward.kwargs of a training config),
for example

    diffrl-fast eval --run runs/r --n 64 \\
        --reward hpsv2 --kwargs '{"checkpoint": "/models/hps/HPS_v2.1_compressed.pt"}' \\
        --reward image_reward --kwargs '{"checkpoint": "/models/ir/ImageReward.pt", "tokenizer_path": "/models/bert"}' \\
        --reward http://127.0.0.1:8000

Every reward is built (model files read, servers' health checked) before the policy loads.
"""
from __future__ import annotations

import argparse
import json

from ..cli import ArgumentParser, UsageError
from ..rewards import RewardError, check_rewards, get_reward
from .sample import add_policy_args, load_policy, sample_images


class _RewardAction(argparse.Action):
    """--reward NAME: appends [NAME, {}] to the list of rewards."""

    def __call__(self, parser, namespace, value, option_string=None):
        rewards = getattr(namespace, self.dest) or []
        rewards.append([value, None])
        setattr(namespace, self.dest, rewards)


class _KwargsAction(argparse.Action):
    """--kwargs JSON: the keyword arguments of the --reward just before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        rewards = getattr(namespace, "reward", None)
        if not rewards:
            raise UsageError("--kwargs must follow the --reward it belongs to")
        if rewards[-1][1] is not None:
            raise UsageError(f"--kwargs given twice for --reward {rewards[-1][0]}")
        try:
            kwargs = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--kwargs of --reward {rewards[-1][0]} is not JSON ({exc}); "
                             "e.g. --kwargs '{\"checkpoint\": \"/models/hps/HPS_v2.1_compressed.pt\"}'") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--kwargs of --reward {rewards[-1][0]} must be a JSON object")
        rewards[-1][1] = kwargs


def build_rewards(specs: list) -> dict:
    """{label: reward fn} for [[name, kwargs or None], ...]; a name used twice is labelled name, name#2, ...
    Usage errors (unknown name, bad kwargs, missing files, a server that fails its health check) raise UsageError."""
    fns = {}
    for name, kwargs in specs:
        label, i = name, 2
        while label in fns:
            label, i = f"{name}#{i}", i + 1
        try:
            fns[label] = get_reward(name, **(kwargs or {}))
        except RewardError as exc:  # an unknown reward, a server that does not answer, keyword arguments it does not take
            hint = "; give its keyword arguments with --kwargs JSON" if "keyword arguments" in str(exc) else ""
            raise UsageError(f"--reward {name}: {exc}{hint}") from None
    return fns


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_args(ap)
    ap.set_defaults(n=256)
    ap.add_argument("--reward", action=_RewardAction, required=True, metavar="NAME",
                    help="reward name, package.module:function or http://HOST:PORT (repeatable)")
    ap.add_argument("--kwargs", action=_KwargsAction, metavar="JSON",
                    help="JSON object of keyword arguments for the --reward just before it")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    fns = build_rewards(args.reward)
    model, defaults = load_policy(args)
    if getattr(model, "is_video", False):
        from ..rewards.values import require_video_rewards

        require_video_rewards(model.kind, fns.items())
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
