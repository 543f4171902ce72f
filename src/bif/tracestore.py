"""Per-token traces on disk: one ``[C, D, K]`` float32 file per side, written as draws arrive.

A causal LM's per-token traces are the largest thing a run keeps (4 bytes per attributed token
per draw per chain: 2,000 draws of 8 chains over 100 k tokens are 6.4 GB). Held in memory and
rewritten whole at every checkpoint, they made resident memory and checkpoint time grow with
the run. A :class:`TraceStore` instead

- buffers the draws of the current block in memory (at most ``buffer_draws`` draws per chain)
  and appends them to its file (``write``), so resident memory does not grow with the draws;
- keeps a done-mask ``[C, D]`` of the draws on disk; a checkpoint flushes the buffer and fsyncs
  the file *before* the state file that records the progress is committed, so a checkpoint
  writes only the new draws and never claims draws that are not on disk;
- pins its file to the run: ``FILE.json`` beside it records the config, identity and shape, and
  a store opened by another config refuses with the diff (:class:`bif.errors.ArtifactError`);
- gives the estimates a read-only memory map (:meth:`TraceStore.tensor`), which
  :class:`bif.tokens.TokenTraces` reads in blocks of columns.

Without a run directory the file is an anonymous temporary file (deleted when the last map of
it goes), so a run without checkpoints has the same bounded memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from bif.config import config_diff
from bif.errors import ArtifactError


class TraceStore:
    """``[C, D, K]`` float32 traces of one side (train or query) in a file.

    Args:
        shape: chains C, draw slots D, attributed tokens K.
        path: the file (created, or reopened after a resume), or None for a temporary file.
        pin: what the file belongs to (config, identity): checked against ``tokens.json``.
        buffer_draws: draws per chain kept in memory before they are appended to the file.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        path: Path | None = None,
        pin: dict[str, Any] | None = None,
        buffer_draws: int = 64,
    ) -> None:
        self.shape = shape
        self.path = path
        C, D, K = shape
        self.row_bytes = K * 4
        self.done = torch.zeros(C, D, dtype=torch.bool)
        self._buffer: dict[tuple[int, int], Tensor] = {}
        self.buffer_draws = max(1, buffer_draws)
        self._file: IO[bytes]
        if path is None:
            self._file = tempfile.TemporaryFile(prefix="bif-tokens-")  # noqa: SIM115
        else:
            _check_pin(path, shape, pin or {})
            mode = "r+b" if path.exists() else "w+b"
            self._file = open(path, mode)  # noqa: SIM115 (kept open for the run)
        # A sparse file of the full size: only the draws written take disk space.
        if os.fstat(self._file.fileno()).st_size != C * D * self.row_bytes:
            self._file.truncate(C * D * self.row_bytes)

    def write(self, chains: list[int], d: int, values: Tensor) -> None:
        """Draw ``d`` of ``chains``: ``values [G, K]`` (buffered, appended in blocks)."""
        # Kept where it was computed until the flush: no host synchronisation per draw.
        v = values.detach().to(torch.float32)
        for i, c in enumerate(chains):
            self._buffer[(c, d)] = v[i].clone()
        if len(self._buffer) >= self.buffer_draws * max(1, len(chains)):
            self.flush(sync=False)

    def flush(self, sync: bool = True) -> None:
        """Write the buffered draws to the file (and, with ``sync``, to the disk)."""
        for (c, d), row in sorted(self._buffer.items()):
            os.pwrite(self._file.fileno(), row.cpu().numpy().tobytes(), self._offset(c, d))
            self.done[c, d] = True
        self._buffer.clear()
        if sync:
            os.fsync(self._file.fileno())

    def _offset(self, c: int, d: int) -> int:
        return (c * self.shape[1] + d) * self.row_bytes

    def restore(self, done: Tensor) -> None:
        """After a resume: the draws marked in ``done`` (from the checkpoint) are on disk."""
        self.done = done.to(torch.bool).clone()

    def rows(self, rows: slice) -> Tensor:
        """Chains ``rows`` of the file as a ``[G, D, K]`` tensor (read; for the distribution)."""
        self.flush(sync=False)
        return self.tensor()[rows].clone()

    def put_rows(self, rows: slice, values: Tensor) -> None:
        """Write chains ``rows`` (another process's, ``[G, D, K]``) into this file."""
        data = values.to("cpu", torch.float32).contiguous().numpy()
        for i, c in enumerate(range(rows.start, rows.stop)):
            os.pwrite(self._file.fileno(), data[i].tobytes(), self._offset(c, 0))
        self.done[rows] = True

    def tensor(self, draws: int | None = None) -> Tensor:
        """The traces ``[C, D, K]`` (or the first ``draws`` draws) as a read-only memory map.

        A draw never written reads as 0 (the run writes every draw it returns; ``done`` says
        which are on disk). Copy-on-write: the map is writable in memory, never to the file."""
        self.flush(sync=False)
        C, D, K = self.shape
        if C * D * K == 0:
            return torch.zeros(C, D if draws is None else draws, K)
        mm = np.memmap(self._file, dtype=np.float32, mode="c", shape=(C, D, K))
        t = torch.from_numpy(mm)  # shares the map
        return t if draws is None else t[:, :draws]


def _check_pin(path: Path, shape: tuple[int, int, int], pin: dict[str, Any]) -> None:
    """``FILE.json`` beside a trace file pins it to one run: write it, or compare.

    (One per file, so that the processes of a distributed run never write the same one.)"""
    meta_path = path.with_name(path.name + ".json")
    want = {"shape": list(shape), **pin}
    if not meta_path.exists():
        from bif.checkpoint import write_json

        if path.exists():
            raise ArtifactError(
                f"{path} has no {meta_path.name}, so it cannot be checked against this run; "
                f"delete {path.parent} to start afresh."
            )
        write_json(meta_path, want)
        return
    try:
        old = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ArtifactError(
            f"{meta_path} is damaged ({e}); delete {path.parent} to start afresh."
        ) from e
    if old != want:
        diff = config_diff(old.get("config", {}), want.get("config", {}))
        if old.get("shape") != want["shape"]:
            diff.append(f"shape [chains, draws, tokens]: {old.get('shape')} -> {want['shape']}")
        if old.get("identity") != want.get("identity"):
            diff.append(f"identity: {old.get('identity')} -> {want.get('identity')}")
        raise ArtifactError(
            f"{path} holds the token traces of another run:\n  " + "\n  ".join(diff)
            + f"\nPass a new run_dir, or delete {path.parent} to start afresh."
        )  # fmt: skip
