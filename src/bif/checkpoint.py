"""On-disk, resumable artefacts of a sampling run, pinned to the run that made them.

A run directory holds:

- ``run.json``: the run's identity (hashes of the weights, the fixed tensors, the data, the task
  and observable, the library version; :mod:`bif.identity`) and the requested config. Written
  once, when the directory is first used; every later call compares against it and refuses
  with a diff of what changed.
- ``curvature.safetensors``: the Hessian eigenpairs behind the mass matrix (read on resume).
- ``state.safetensors``: moments, traces, the active chain group's sampler state and random
  generator states, with the progress metadata in the same file's header. A run spread over
  processes (:mod:`bif.distributed`) writes one ``state.chains-LO-HI.safetensors`` per process,
  each holding chains ``LO..HI-1``; a relaunch with another split refuses rather than mix them.

Every file is one commit point: it is written to a temporary name, flushed to disk (``fsync``),
renamed over the old one, and the directory entry is flushed too. A kill at any moment leaves
either the previous checkpoint or the new one, never a mix. A file that cannot be parsed (a
truncated copy, garbage) raises :class:`ArtifactError` naming it, never a raw parser error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from bif.config import config_diff
from bif.errors import ArtifactError
from bif.identity import values_match

RUN_FILE = "run.json"
STATE_FILE = "state.safetensors"
CURVATURE_FILE = "curvature.safetensors"
# What older versions wrote (two files per checkpoint, no commit point): never resumed from.
LEGACY_FILES = ("state.json", "curvature.json")
# The header key holding a file's JSON metadata (safetensors metadata maps str -> str).
META_KEY = "bif"


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then flush and rename ``tmp`` over ``path``: the rename is the commit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=1, sort_keys=True)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def file_digest(path: Path) -> dict[str, Any]:
    """Size and content hash of a file (what a manifest records to detect a damaged copy)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "blake2b": h.hexdigest()}


def damaged(path: Path, why: str, fix: str) -> ArtifactError:
    return ArtifactError(f"{path} is damaged or is not a file bif wrote ({why}). {fix}")


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from ``path``, or :class:`ArtifactError` (saying ``fix``) if unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(path, f"{type(e).__name__}: {e}", fix) from e
    if not isinstance(obj, dict):
        raise damaged(path, f"expected a JSON object, found {type(obj).__name__}", fix)
    return obj


def save_tensors(
    path: Path, tensors: dict[str, Tensor], meta: dict[str, Any] | None = None
) -> None:
    """Tensors (and their JSON metadata, if any) in one safetensors file, written atomically."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = None if meta is None else {META_KEY: json.dumps(meta, sort_keys=True)}
    write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=header))


def load_tensors(
    path: Path, fix: str, with_meta: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Inverse of :func:`save_tensors`; :class:`ArtifactError` (saying ``fix``) if damaged.
    With ``with_meta=False`` the file needs no metadata (and ``{}`` is returned for it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise damaged(path, f"{type(e).__name__}: {e}", fix) from e
    if not with_meta:
        return tensors, {}
    if META_KEY not in header:
        raise damaged(path, "its header has no bif metadata", fix)
    try:
        meta = json.loads(header[META_KEY])
    except ValueError as e:
        raise damaged(path, f"its metadata is not JSON: {e}", fix) from e
    if not isinstance(meta, dict):
        raise damaged(path, "its metadata is not a JSON object", fix)
    return tensors, meta


def _fresh_start(run_dir: Path) -> str:
    return f"Delete {run_dir} (or pass a new run_dir) to start afresh."


# -- run manifest ----------------------------------------------------------------------------


def open_run(
    run_dir: Path, identity: dict[str, str], values: dict[str, list[float]], config: dict[str, Any]
) -> bool:
    """Pin ``run_dir`` to this run, or check that it already is; True if it was used before.

    Args:
        identity: component -> hash (:func:`bif.identity.run_identity`).
        values: losses and observables at w* (:func:`bif.identity.checkpoint_values`).
        config: the requested config (before 'auto' values are resolved).

    Raises:
        ArtifactError: the directory holds another run (the message lists what differs), a
            damaged manifest, or files of an older bif version.
    """
    manifest = run_dir / RUN_FILE
    if not manifest.exists():
        legacy = [n for n in (*LEGACY_FILES, STATE_FILE, CURVATURE_FILE) if (run_dir / n).exists()]
        if legacy:
            raise ArtifactError(
                f"{run_dir} holds {', '.join(legacy)} but no {RUN_FILE}: it was written by an "
                "older version of bif (or damaged), so it cannot be checked against this run. "
                + _fresh_start(run_dir)
            )
        write_json(manifest, {"identity": identity, "at_checkpoint": values, "config": config})
        return False
    saved = read_json(manifest, _fresh_start(run_dir))
    old = saved.get("identity")
    if not isinstance(old, dict):
        raise damaged(manifest, "it has no identity", _fresh_start(run_dir))
    order = [*_COMPONENTS, *sorted(set(old) | set(identity))]
    differs = [k for k in dict.fromkeys(order) if old.get(k) != identity.get(k)]
    if not differs and not values_match(saved.get("at_checkpoint") or {}, values):
        differs = ["at_checkpoint"]
    if differs:
        version = ""
        if "bif_version" in differs:
            version = (
                f" (written by bif {old.get('bif_version')}, this is {identity.get('bif_version')})"
            )
        raise ArtifactError(
            f"{run_dir} holds a run of different {', '.join(describe(k) for k in differs)}"
            f"{version}; resuming would mix two runs. Pass a new run_dir, or delete this one "
            "to start afresh."
        )
    _check_config(run_dir, saved.get("config"), config)
    return True


def _check_config(run_dir: Path, saved: Any, config: dict[str, Any]) -> None:
    if saved != config:
        diff = "\n  ".join(config_diff(saved if isinstance(saved, dict) else {}, config))
        raise ArtifactError(
            f"{run_dir} holds a run with a different config:\n  {diff}\n"
            "Use the saved values to resume it, or pass a new run_dir (or delete this one) to "
            "start afresh."
        )


_COMPONENTS = {
    "weights": "sampled weights (or their dtype)",
    "fixed": "frozen parameters or buffers (e.g. BatchNorm statistics)",
    "architecture": "model architecture",
    "train": "training data",
    "query": "query data",
    "task": "task (training loss)",
    "observable": "query observable",
    "at_checkpoint": "losses or observables at the checkpoint",
    "bif_version": "bif version",
}


def describe(component: str) -> str:
    return _COMPONENTS.get(component, component)


# -- sampler state ---------------------------------------------------------------------------


def state_file(chains: tuple[int, int] | None = None) -> str:
    """The sampler checkpoint's name: ``state.safetensors``, or for the process that owns
    chains ``[lo, hi)`` of a distributed run ``state.chains-LO-HI.safetensors``."""
    return STATE_FILE if chains is None else f"state.chains-{chains[0]}-{chains[1] - 1}.safetensors"


def save(
    run_dir: Path, tensors: dict[str, Tensor], meta: dict[str, Any], name: str = STATE_FILE
) -> None:
    """The sampler checkpoint: tensors and progress ``meta`` in one file, one commit point."""
    save_tensors(run_dir / name, tensors, meta)


def load(
    run_dir: Path,
    config: dict[str, Any],
    digest: str,
    name: str = STATE_FILE,
    siblings: tuple[str, ...] = (),
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The saved state if ``run_dir`` holds one made by the same config and run, else None.

    ``name`` is this process's checkpoint and ``siblings`` those of the other processes of
    the same split (:func:`state_file`); any other state file is another split's.

    Raises:
        ArtifactError: the state belongs to another config or run, is damaged, or the
            directory holds the checkpoints of another split of the chains over processes.
    """
    mine = {name, *siblings}
    found = run_dir.glob("state*.safetensors") if run_dir.is_dir() else []
    others = sorted(p.name for p in found if p.name not in mine)
    if others:
        raise ArtifactError(
            f"{run_dir} holds {', '.join(others)}, the checkpoints of this run split over "
            f"another number of processes, and this process would write {name}. Relaunch with "
            "the number of processes that wrote them (one file per process; "
            "state.safetensors: a single process), or delete the directory to start afresh."
        )
    path = run_dir / name
    if not path.exists():
        return None
    tensors, meta = load_tensors(path, _fresh_start(run_dir))
    _check_config(run_dir, meta.get("config"), config)
    if meta.get("identity") != digest:
        raise ArtifactError(
            f"{path} belongs to another run (identity {meta.get('identity')} != {digest}). "
            + _fresh_start(run_dir)
        )
    return tensors, meta


# -- curvature -------------------------------------------------------------------------------


def save_curvature(run_dir: Path, key: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    save_tensors(run_dir / CURVATURE_FILE, tensors, {"key": key})


def load_curvature(run_dir: Path, key: dict[str, Any]) -> dict[str, Tensor] | None:
    """The stored curvature tensors if they were computed under ``key``, else None."""
    path = run_dir / CURVATURE_FILE
    if not path.exists():
        return None
    tensors, meta = load_tensors(path, _fresh_start(run_dir))
    return tensors if meta.get("key") == key else None
