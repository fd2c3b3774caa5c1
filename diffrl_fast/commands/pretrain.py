"""``diffrl-fast pretrain WORLD``: retrain a built-in world's shipped weights.

- ``digits``: the digits world (UNet, class embedding, the digit classifiers that are its reward).
- ``flow-digits``: the flow-digits world (SD3 transformer and prompt encoder; its reward reuses the digits
  world's classifiers), with its quality report; ``--budget-s`` caps the transformer's training time.
"""
from __future__ import annotations

from ..cli import ArgumentParser


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("world", choices=["digits", "flow-digits"], help="what to pretrain")
    ap.add_argument("--out", default=None, help="output folder (default: the package's assets folder)")
    ap.add_argument("--quick", action="store_true", help="a few steps only (a smoke run, not usable weights)")
    ap.add_argument("--budget-s", type=float, default=1500.0, help="flow-digits: seconds of transformer training (default 1500)")
    args = ap.parse_args(argv)
    if args.world == "digits":
        from ..models.digits import pretrain_main

        pretrain_main(args.out, quick=args.quick)
    else:
        from ..models.flow_digits import pretrain_main

        pretrain_main(args.out, quick=args.quick, time_budget_s=args.budget_s)
    return 0
