"""Algorithms, one file each, selected by ``algo=NAME``."""
from __future__ import annotations

from .base import Algorithm, EpochData
from .ddpo import DDPO, DDPO_SF

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (DDPO, DDPO_SF)}


def make_algorithm(cfg) -> Algorithm:
    if cfg.algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {cfg.algo!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[cfg.algo](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "EpochData", "make_algorithm"]
