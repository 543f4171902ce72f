"""What the loop keeps of each draw: streaming moments, batch-means blocks and traces.

The loop hands every draw to :meth:`Recorder.draw` (blackjax's ``transform(state, info)`` hook,
specialised to what a BIF needs); adding a statistic means adding it here, not in the loop.
Every tensor has the chain as its first dimension and holds all ``C`` chains, so a process that
owns only some chains (:mod:`bif.distributed`) fills its own rows, checkpoints only those
(:meth:`Recorder.state`) and fetches the others' at the end (:meth:`Recorder.share`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bif.estimator import Moments, init_moments, update_moments
from bif.mcse import Blocks, chain_comoment, init_blocks, update_blocks
from bif.tracestore import TraceStore

# With batch-means blocks, each chain's whole co-moment is derived from them when it is read
# (bif.mcse.chain_comoment) instead of a second [C, Q, N] pass at every draw. False: the
# streaming twin (the tests check both agree).
DERIVE_COMOMENT = True


class Recorder:
    """Per-chain statistics and traces of a run. C chains, D draw slots, T steps.

    Attributes:
        moments: Welford moments (:class:`bif.estimator.Moments`), on the sampling device.
        blocks: batch-means moments (:mod:`bif.mcse`), or None when disabled.
        draw_loss: ``[C, D]`` float64 mean attributed-train loss at each draw.
        step_loss: ``[C, T]`` float64 minibatch (or full-batch) loss at each sampler step.
        query_trace: ``[C, D, Q]`` float64 query observables at each draw.
        energy: ``[C, D]`` float64 ``U(w) - U(w*)`` at each draw.
        train_trace: ``[C, D, S]`` float64 losses of the training examples ``train_index``.
        token_store: the per-token train ``[C, D, Kn]`` and query ``[C, D, Kq]`` float32
            losses on disk (:class:`bif.tracestore.TraceStore`; token tasks only);
            :attr:`token_train` / :attr:`token_query` read them.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int, int],
        device: torch.device,
        slots: int,
        first_block: int,
        train_index: Tensor,
        token_store: tuple[TraceStore, TraceStore] | None,
        defer: bool = False,
    ) -> None:
        C, D, T, N, Q = shape
        self.train_index = train_index
        self._train_index = train_index.to(device)
        # defer: the host copies of the traces wait for flush() (an accelerator's loop then
        # never waits for the device between checks); else every value is copied at once.
        self.defer = defer
        self._pending: list[tuple[slice, int, tuple[Tensor, ...]]] = []
        self.last_draw = -1
        self._moments = init_moments(C, N, Q, device)
        self.blocks = init_blocks(C, slots, N, Q, first_block, device) if slots else None
        self._derive = DERIVE_COMOMENT and self.blocks is not None
        self._stale = False  # the derived co-moment lags the blocks
        nan = lambda *s, dtype=torch.float64: torch.full(s, math.nan, dtype=dtype)  # noqa: E731
        self.draw_loss = nan(C, D)
        self.step_loss = nan(C, T)
        self.query_trace = nan(C, D, Q)
        self.energy = nan(C, D)
        self.train_trace = nan(C, D, len(train_index))
        self.token_store = token_store
        self.used = D  # draws per chain returned (fewer after an adaptive stop)

    @property
    def moments(self) -> Moments:
        """The Welford moments (the co-moment derived from the blocks first, if it lags)."""
        if self._stale:
            assert self.blocks is not None
            m = self._moments
            m.comoment.copy_(chain_comoment(self.blocks, m.mean_a, m.mean_b))
            self._stale = False
        return self._moments

    def step(self, chains: list[int], t: int, loss: Tensor) -> None:
        """Record the loss ``[G]`` of sampler step ``t`` of ``chains``."""
        self._host(_rows(chains), t, (loss.detach(),))

    def _host(self, rows: slice, at: int, values: tuple[Tensor, ...]) -> None:
        """Copy ``values`` into the host traces now, or at the next :meth:`flush`."""
        if self.defer:
            self._pending.append((rows, at, values))
        else:
            self._put(rows, at, values)

    def _put(self, rows: slice, at: int, values: tuple[Tensor, ...]) -> None:
        host = [v.to("cpu", torch.float64) for v in values]
        if len(host) == 1:  # a step's loss
            self.step_loss[rows, at] = host[0]
            return
        self.train_trace[rows, at], self.energy[rows, at] = host[0], host[1]
        self.draw_loss[rows, at], self.query_trace[rows, at] = host[2], host[3]

    def flush(self) -> None:
        """Copy the deferred values into the host traces (waits for the device once)."""
        pending, self._pending = self._pending, []
        for rows, at, values in pending:
            self._put(rows, at, values)

    def draw(
        self,
        chains: list[int],
        d: int,
        a: Tensor,
        b: Tensor,
        energy: Tensor,
        tokens: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Add draw ``d`` of ``chains`` (a contiguous block).

        Args:
            a: train losses ``[G, N]``; b: query observables ``[G, Q]``;
            energy: ``[G]``; tokens: per-token train ``[G, Kn]`` and query ``[G, Kq]`` losses.
        """
        # A group is a contiguous block of chains: slices update the statistics in place.
        rows = _rows(chains)
        update_moments(self._moments, rows, a, b, inplace=True, comoment=not self._derive)
        self._stale = self._derive
        if self.blocks is not None:
            update_blocks(self.blocks, rows, d, a, b)
        host = (a[:, self._train_index], energy.detach(), a.mean(1), b)
        self._host(rows, d, host)
        self.last_draw = d
        if tokens is not None:
            assert self.token_store is not None
            self.token_store[0].write(chains, d, tokens[0])
            self.token_store[1].write(chains, d, tokens[1])

    @property
    def token_train(self) -> Tensor | None:
        """``[C, D, Kn]`` per-token train losses (a read-only map of the store's file)."""
        return None if self.token_store is None else self.token_store[0].tensor(self.used)

    @property
    def token_query(self) -> Tensor | None:
        return None if self.token_store is None else self.token_store[1].tensor(self.used)

    # -- checkpoint and distribution --------------------------------------------------------

    def _named(self) -> dict[str, Tensor]:
        out = {f"moments.{f}": t for f, t in zip(Moments._fields, self.moments, strict=True)}
        out.update(draw_loss=self.draw_loss, step_loss=self.step_loss)
        out.update(query_trace=self.query_trace, energy=self.energy, train_trace=self.train_trace)
        if self.blocks is not None:
            out.update({f"blocks.{f}": t for f, t in zip(Blocks._fields, self.blocks, strict=True)})
        return out

    def state(self, rows: slice) -> dict[str, Tensor]:
        """The rows ``rows`` (the chains this process owns) of every tensor, for a checkpoint.

        The token traces are not in it: their store's new draws are flushed to its file (and
        fsynced) first, and only its done-masks go into the checkpoint."""
        self.flush()
        out = {k: v[rows] for k, v in self._named().items()}
        if self.token_store is not None:
            for side, store in zip(("train", "query"), self.token_store, strict=True):
                store.flush(sync=True)
                out[f"tokens.done.{side}"] = store.done[rows]
        return out

    def load(self, saved: dict[str, Tensor], rows: slice) -> None:
        """Inverse of :meth:`state`: fill rows ``rows`` from a checkpoint."""
        for k, v in self._named().items():
            v[rows] = saved[k].to(v.device)
        self._stale = self._derive
        if self.token_store is not None:
            for side, store in zip(("train", "query"), self.token_store, strict=True):
                done = store.done.clone()
                done[rows] = saved[f"tokens.done.{side}"]
                store.restore(done)

    def share(
        self, owners: list[slice], exchange: Any, prefixes: tuple[str, ...] | None = None
    ) -> None:
        """Fill every row from the process that owns it: ``exchange(tensor, rows, src)``
        broadcasts ``tensor[rows]`` from rank ``src`` into every process's copy. Only the
        tensors whose names start with one of ``prefixes``, if given."""
        self.flush()
        for name, t in self._named().items():
            if prefixes is not None and not name.startswith(prefixes):
                continue
            for src, rows in enumerate(owners):
                exchange(t, rows, src)
        self._stale = self._derive  # (the other rows' blocks arrived after their co-moment)
        if self.token_store is not None and (prefixes is None or "tokens" in prefixes):
            for store in self.token_store:
                for src, rows in enumerate(owners):
                    exchange_store(store, rows, src, exchange)

    def trim(self, used: int, steps: int) -> None:
        """Keep the first ``used`` draws and ``steps`` steps (an adaptive run that stopped)."""
        self.flush()
        self.draw_loss, self.query_trace = self.draw_loss[:, :used], self.query_trace[:, :used]
        self.energy, self.train_trace = self.energy[:, :used], self.train_trace[:, :used]
        self.step_loss = self.step_loss[:, :steps]
        self.used = used


def exchange_store(store: TraceStore, rows: slice, src: int, exchange: Any) -> None:
    """Chains ``rows`` of ``store`` from rank ``src`` into every rank's store file, through
    ``exchange(tensor, rows, src)`` on a ``[G, D, K]`` staging copy of those rows."""
    if rows.start == rows.stop:
        return
    stage = store.rows(rows)  # the owner's draws; zeros (unwritten) elsewhere
    exchange(stage, slice(0, rows.stop - rows.start), src)
    store.put_rows(rows, stage)


def _rows(chains: list[int]) -> slice:
    """A group's chains (always a contiguous block) as a slice: indexing a device tensor by a
    host list would copy the index to the device, a synchronisation on CUDA."""
    if chains != list(range(chains[0], chains[0] + len(chains))):
        raise ValueError(f"a chain group must be a contiguous block of chains, got {chains}")
    return slice(chains[0], chains[0] + len(chains))
