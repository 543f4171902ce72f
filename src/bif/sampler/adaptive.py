"""``num_draws='auto'`` inside the loop: when to check, who decides, and what a stop records.

The targets themselves are pure functions (:mod:`bif.stopping`); this is the loop's side of
them. Every ``check_every`` draws per chain (and at the capacity) the run is checked over every
chain: chain-parallel processes fetch the others' statistics first, and in any process group
rank 0 decides for all (its clock decides ``max_seconds``). A stop recorded before a resume
holds again, so a resumed run stops at the same draw.
"""

from __future__ import annotations

import logging
from typing import Any

from bif import distributed, stopping
from bif.config import BIFConfig
from bif.distributed import Partition
from bif.sampler.recorder import Recorder

log = logging.getLogger(__name__)

# What an adaptive check needs of every chain (the token traces stay where they are).
CHECK_TENSORS = ("moments.", "blocks.", "draw_loss", "query_trace")


class Stopper:
    """Decides whether an adaptive run ends after a draw.

    Args:
        stop: the stop a checkpoint recorded (None: not stopped yet).
        checked: draws up to which the checks were already made (:func:`checks_made`).
        collective: the checks involve every process (distributed runs).
    """

    def __init__(
        self,
        cfg: BIFConfig,
        part: Partition,
        stop: dict[str, Any] | None,
        checked: int,
        collective: bool,
    ) -> None:
        self.cfg, self.part, self.checked, self.collective = cfg, part, checked, collective
        self.owners = [part.owner(r) for r in range(part.world)]
        if part.distributed and cfg.adaptive:
            # A stop that any rank recorded holds for all (it was decided on rank 0 for all).
            stop = distributed.first_not_none(stop)
        self.stop = stop

    def after(self, d: int, rec: Recorder, seconds: float, sync: Any = None) -> bool:
        """True if the run stops after draw ``d`` (0-based); ``sync`` is called before a check
        reads the recorder (the deferred divergence checks and host copies)."""
        cfg = self.cfg
        if not cfg.adaptive:
            return False
        if self.stop is not None:  # recorded before a resume
            return d + 1 >= self.stop["draws"]
        if (d + 1) % cfg.check_every and d + 1 != cfg.draws_capacity:
            return False
        if d + 1 > self.checked:
            if sync is not None:
                sync()
            self.stop = self._check_all(rec, d + 1, seconds)
        return self.stop is not None

    def _check_all(self, rec: Recorder, draws: int, seconds: float) -> dict[str, Any] | None:
        if self.part.distributed:
            distributed.agree()
            rec.share(self.owners, distributed.exchange_rows, CHECK_TENSORS)
        stop = None
        if distributed.is_main():
            stop = adaptive_stop(rec, draws, self.cfg, seconds)
        return distributed.broadcast(stop) if self.collective else stop


def checks_made(
    part: Partition, cfg: BIFConfig, done_groups: list[int],
    active: dict[str, Any] | None, stop: dict[str, Any] | None,
) -> int:  # fmt: skip
    """Draws up to which the adaptive checks were already made before a resume.

    The checks of a distributed run are collective, so a rank that resumes from an older
    checkpoint than another must not repeat the checks the other has passed: every check up to
    the furthest rank's draw was made (and said "go on")."""
    if not (part.distributed and cfg.adaptive):
        return 0
    draws = 0
    if done_groups:
        draws = int((stop or {}).get("draws", cfg.draws_capacity))
    elif active is not None:
        draws = max(0, active["step"] - cfg.num_burnin) // cfg.thin
    return distributed.max_int(draws)


def adaptive_stop(
    rec: Recorder, draws: int, cfg: BIFConfig, seconds: float
) -> dict[str, Any] | None:
    """The stop record if the targets or the budget end the run after ``draws`` draws."""
    status = stopping.check(
        rec.moments, rec.blocks, rec.draw_loss[:, :draws], rec.query_trace[:, :draws], cfg
    )
    if status["met"]:
        reason = "targets_met"
    elif draws >= cfg.max_draws:
        reason = "max_draws"
    elif cfg.max_seconds is not None and seconds >= cfg.max_seconds:
        reason = "max_seconds"
    else:
        log.info("num_draws='auto': %d draws, not yet: %s", draws, status)
        return None
    stop = {"reason": reason, "draws": draws, "seconds": seconds, "status": status}
    log.info("num_draws='auto': %s", stopping.describe(stop, cfg))
    return stop
