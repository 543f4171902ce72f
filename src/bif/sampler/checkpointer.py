"""The run's checkpoint: what it holds, which process writes it, when, and how it resumes.

A checkpoint is one safetensors state file per process that owns chains (the
:class:`~bif.sampler.recorder.Recorder`'s rows of its chains, the active group's sampler
state and generators) with its JSON meta, written atomically by :func:`bif.checkpoint.save`.
Chain-parallel processes write ``state.chains-LO-HI.safetensors`` each; data-parallel ones
hold the same state, so rank 0 writes it and broadcasts it on resume.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bif import checkpoint, distributed
from bif.distributed import Partition
from bif.sampler.recorder import Recorder
from bif.sampler.rng import ChainRandom

log = logging.getLogger(__name__)


@dataclass
class Resume:
    """What a checkpoint says was done: finished groups, the active group's position."""

    done_groups: list[int] = field(default_factory=list)
    active: dict[str, Any] | None = None  # {"group": g, "step": t} of an unfinished group
    stop: dict[str, Any] | None = None  # num_draws='auto': the stop it recorded (read only)
    seconds: float = 0.0  # sampling time before the resume
    saved: dict[str, Tensor] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        return bool(self.saved)


class Checkpointer:
    """Saves and loads this process's share of a run in ``run_dir`` (None: never).

    Args:
        every: draws between checkpoints (also at least every ``max_seconds`` seconds, and at
            the end of each chain group).
    """

    def __init__(
        self,
        run_dir: Path | None,
        config: dict[str, Any],
        identity: str,
        part: Partition,
        writer: bool,
        every: int,
        max_seconds: float = 60.0,
    ) -> None:
        self.run_dir, self.config, self.identity = run_dir, config, identity
        self.every, self.max_seconds = every, max_seconds
        owners = [part.owner(r) for r in range(part.world)]
        names = [checkpoint.state_file((o.start, o.stop)) for o in owners]
        self.name = names[part.rank] if part.distributed else checkpoint.STATE_FILE
        self.siblings = tuple(n for r, n in enumerate(names) if part.distributed and r != part.rank)
        self.rows = part.rows
        # Data-parallel processes hold the same state: one of them writes it.
        self.writer = writer
        self.last = time.monotonic()

    @property
    def token_stem(self) -> str:
        """File stem of the per-token trace stores that go with this state file."""
        return self.name.removesuffix(".safetensors").replace("state", "tokens", 1)

    def load(self, rec: Recorder, broadcast: bool) -> Resume:
        """Fill ``rec`` from the checkpoint, if there is one; ``broadcast``: rank 0 reads it
        for every process (data-parallel)."""
        if self.run_dir is None:
            return Resume()
        loaded = None
        if self.writer:
            loaded = checkpoint.load(
                self.run_dir, self.config, self.identity, self.name, self.siblings
            )
        if broadcast:
            loaded = distributed.broadcast(loaded)
        if loaded is None:
            return Resume()
        saved, meta = loaded
        rec.load(saved, self.rows)
        log.info("resuming from %s: %d chain group(s) done", self.run_dir, len(meta["done_groups"]))
        return Resume(
            meta["done_groups"], meta.get("active"), meta.get("stop"),
            float(meta.get("seconds", 0.0)), saved,
        )  # fmt: skip

    def due(self, draw: int) -> bool:
        """Is a checkpoint due after draw ``draw`` (0-based)?"""
        if self.run_dir is None:
            return False
        return (draw + 1) % self.every == 0 or time.monotonic() - self.last > self.max_seconds

    def save(
        self,
        rec: Recorder,
        resume: Resume,
        seconds: float,
        stop: dict[str, Any] | None,
        active: dict[str, Any] | None = None,
        state: Any = None,
        rng: ChainRandom | None = None,
    ) -> None:
        """Write ``rec``'s rows with ``resume``'s finished groups and ``stop`` (the adaptive
        stop so far, or None); with ``active``, also the
        active group's sampler ``state`` and generators (resumed at ``active["step"]``)."""
        self.last = time.monotonic()
        if self.run_dir is None or not self.writer:
            return
        extra: dict[str, Tensor] = {}
        if state is not None:
            extra.update(flatten_state(state))
        if rng is not None:
            extra.update(rng.states())
        meta = {
            "config": self.config,
            "identity": self.identity,
            "done_groups": resume.done_groups,
            "active": active,
            "stop": stop,
            "seconds": seconds,
        }
        checkpoint.save(self.run_dir, {**rec.state(self.rows), **extra}, meta, self.name)


def flatten_state(state: Any) -> dict[str, Tensor]:
    """Sampler state NamedTuple -> flat ``sampler.<field>[.<param>]`` tensors for safetensors."""
    out: dict[str, Tensor] = {}
    for f in type(state)._fields:
        v = getattr(state, f)
        if isinstance(v, dict):
            out.update({f"sampler.{f}.{k}": t for k, t in v.items()})
        else:
            out[f"sampler.{f}"] = v
    return out


def unflatten_state(template: Any, saved: dict[str, Tensor], device: torch.device) -> Any:
    """Inverse of :func:`flatten_state`, shaped like ``template``."""
    values = []
    for f in type(template)._fields:
        v = getattr(template, f)
        if isinstance(v, dict):
            values.append({k: saved[f"sampler.{f}.{k}"].to(device) for k in v})
        else:
            values.append(saved[f"sampler.{f}"].to(device))
    return type(template)(*values)
