"""Algorithms, one file each, selected by ``algo=NAME``."""
from __future__ import annotations

from .._extras import require_train

require_train("diffrl_fast.algos")

from .awm import AWM
from .dgpo import DGPO
from .base import Algorithm, EpochData
from .d3po import D3PO
from .ddpo import DDPO, DDPO_SF
from .dense import Dense
from .dpok import DPOK
from .grpo import GRPO
from .nft import NFT
from .tdpo import TDPO, TDPO_R

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (DDPO, DDPO_SF, DPOK, D3PO, Dense, TDPO, TDPO_R, GRPO, NFT, AWM, DGPO)}


def make_algorithm(cfg) -> Algorithm:
    if cfg.algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {cfg.algo!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[cfg.algo](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "EpochData", "make_algorithm"]
