"""Spreading a run over the processes of a ``torch.distributed`` group.

Under ``torchrun --nproc-per-node K`` (or any initialised default process group),
:func:`bif.attribute` splits the ``C`` chains into ``K`` contiguous blocks, one per rank. Chain
``c`` draws its noise and minibatches from its own generators seeded by ``(seed, c)``
(:mod:`bif.sampler.rng`), so a chain's trajectory does not depend on which process runs it or
with whom; at the end every rank fetches the other ranks' per-chain moments and traces, and the
result is bit for bit the single-process one (with ``vmap_chains=False``, where each chain is
its own group; vmapped groups of another size may round differently, see the README).

With ``parallel="data"`` every rank runs every chain but evaluates and differentiates only its
slice of the training set (:class:`Shard`); the gradient is all-reduced at every step and the
draw's training losses are gathered. The sum of the slices' gradients rounds differently from
the one-process sum over chunks, so the result equals the one-process run up to float64
summation order (a relative 1e-16 per step, which a localised, damped chain does not amplify;
the tests hold it to 1e-9). Rank 0 writes the shared state file and, on a resume, reads it
for every rank.

Only rank 0 resolves the automatic settings, runs the pilot and writes the run directory's
shared files; the others receive its config and curvature. Every rank checkpoints the chains it
owns (``state.chains-LO-HI.safetensors``). A rank that fails tells the others at the next
collective point (:func:`agree`), so one rank's error ends every rank with an error instead of
a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bif.errors import BIFError, ConfigError


class RankError(BIFError, RuntimeError):
    """Another process of the group failed; its error message is in this one's."""


@dataclass(frozen=True)
class Partition:
    """Which chains each rank runs: rank ``r`` owns chains ``[bounds[r], bounds[r + 1])``."""

    rank: int
    world: int
    bounds: tuple[int, ...]

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def rows(self) -> slice:
        """This rank's chains as a slice of the chain dimension."""
        return self.owner(self.rank)

    def owner(self, rank: int) -> slice:
        return slice(self.bounds[rank], self.bounds[rank + 1])

    @property
    def chains(self) -> list[int]:
        return list(range(self.bounds[self.rank], self.bounds[self.rank + 1]))


def single(num_chains: int) -> Partition:
    """Every chain in this process."""
    return Partition(0, 1, (0, num_chains))


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def partition(num_chains: int) -> Partition:
    """The chain split over the current process group (:func:`single` without one).

    Raises:
        ConfigError: fewer chains than processes (a rank would have nothing to do).
    """
    if not active():
        return single(num_chains)
    world, rank = dist.get_world_size(), dist.get_rank()
    if num_chains < world:
        raise ConfigError(
            f"num_chains={num_chains} is fewer than the {world} processes of the group: every "
            f"process runs whole chains. Use num_chains >= {world} (a multiple of {world} "
            "balances the work), or launch fewer processes."
        )
    return Partition(rank, world, _split(num_chains, world))


def world_size() -> int:
    """Processes in the current group (1 without one)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes results and reports."""
    return not active() or dist.get_rank() == 0


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(error: BaseException | None = None) -> None:
    """A collective check point: every rank says whether it failed; if one did, all raise.

    The failing rank passes its exception (and re-raises it); the others raise
    :class:`RankError` quoting it. Outside a process group this only re-raises ``error``.
    """
    if not active():
        if error is not None:
            raise error
        return
    every = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(every) if m is not None]
    if failed:
        r, m = failed[0]
        raise RankError(f"rank {r} of the process group failed, so this one stops too: {m}")


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (tensors inside must be on the CPU)."""
    if not active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def same_everywhere(value: str, what: str, fix: str) -> None:
    """Check that every rank holds the same ``value`` (e.g. a digest of its model and data).

    Raises:
        ConfigError: on every rank, naming the first rank that differs from rank 0.
    """
    if not active():
        return
    every = gather_objects(value)
    differ = [r for r, v in enumerate(every) if v != every[0]]
    if differ:
        raise ConfigError(
            f"rank {differ[0]} has a different {what} than rank 0 ({every[differ[0]]} != "
            f"{every[0]}): {fix}"
        )


def exchange_rows(t: Tensor, rows: slice, src: int) -> None:
    """``t[rows]`` from rank ``src`` into every rank's ``t`` (in place)."""
    if rows.start == rows.stop:
        return
    buf = t[rows].to(_comm_device()).contiguous()
    dist.broadcast(buf, src=src)
    if dist.get_rank() != src:
        t[rows] = buf.to(t.device)


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_int(value: int) -> int:
    """The largest ``value`` over the ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def first_not_none(obj: Any) -> Any:
    """The first rank's ``obj`` that is not None (None if every rank's is)."""
    return next((o for o in gather_objects(obj) if o is not None), None)


@dataclass(frozen=True)
class Shard:
    """Data-parallel split: rank ``r`` evaluates and differentiates the training examples
    ``[bounds[r], bounds[r + 1])`` for every chain."""

    rank: int
    world: int
    bounds: tuple[int, ...]

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]


def shard(num_train: int) -> Shard | None:
    """The training-set split over the current process group (None without one).

    Raises:
        ConfigError: fewer training examples than processes.
    """
    if not active():
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if num_train < world:
        raise ConfigError(
            f"parallel='data' splits the {num_train} training examples over {world} processes: "
            "each needs at least one. Use parallel='chains' or fewer processes."
        )
    return Shard(rank, world, _split(num_train, world))


def _split(n: int, world: int) -> tuple[int, ...]:
    # Contiguous, as equal as possible: the first n mod world ranks take one more.
    base, extra = divmod(n, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (r < extra))
    return tuple(bounds)


def sum_over_ranks(tensors: list[Tensor]) -> list[Tensor]:
    """Element-wise sums over the ranks of ``tensors`` (one all-reduce of one flat buffer)."""
    if not active():
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(tensors[0].device)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def gather_columns(t: Tensor, sizes: list[int]) -> Tensor:
    """``[G, sizes[rank]]`` per rank -> ``[G, sum(sizes)]`` on every rank, in rank order."""
    if not active():
        return t
    width = max(sizes)
    pad = torch.zeros(t.shape[0], width, *t.shape[2:], dtype=t.dtype, device=_comm_device())
    pad[:, : t.shape[1]] = t.to(pad.device)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1).to(t.device)
