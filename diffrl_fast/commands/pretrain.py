"""``diffrl-fast pretrain digits``: retrain the digits world's shipped weights (UNet, class embedding, classifier)."""
from __future__ import annotations

from ..cli import ArgumentParser


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast pretrain", description=__doc__)
    ap.add_argument("world", choices=["digits"], help="what to pretrain")
    ap.add_argument("--out", default=None, help="output folder (default: the package's assets folder)")
    ap.add_argument("--quick", action="store_true", help="a few steps only (a smoke run, not usable weights)")
    args = ap.parse_args(argv)
    from ..models.digits import pretrain_main

    pretrain_main(args.out, quick=args.quick)
    return 0
