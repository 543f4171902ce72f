"""On-disk, resumable state of a sampling run, pinned to the config and model that made it.

A run directory holds ``state.safetensors`` (moments, traces, the active chain group's sampler
state and random generator states) and ``state.json`` (config, fingerprint, progress). Both are
written to temporary names and renamed, so a crash mid-write leaves the previous checkpoint whole.
Reopening with a different config or model refuses with a diff instead of mixing runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from bif.config import config_diff
from bif.errors import ArtifactError

STATE_FILE = "state.safetensors"
META_FILE = "state.json"


def fingerprint(w_star: dict[str, Tensor], num_train: int, num_query: int, task: str) -> str:
    """A short hash identifying the checkpoint weights and data sizes of a run."""
    h = hashlib.sha256()
    h.update(f"{num_train}:{num_query}:{task}".encode())
    for k in sorted(w_star):
        t = w_star[k].detach().to("cpu", torch.float64).contiguous()
        h.update(k.encode())
        # The sampling dtype too: the same weights run in float32 and float64 are different runs.
        h.update(f"{tuple(t.shape)}:{w_star[k].dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def save(run_dir: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp_state, tmp_meta = run_dir / (STATE_FILE + ".tmp"), run_dir / (META_FILE + ".tmp")
    save_file(cpu, str(tmp_state))
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
    # state first, then meta: meta names what the state holds, so it must never run ahead.
    os.replace(tmp_state, run_dir / STATE_FILE)
    os.replace(tmp_meta, run_dir / META_FILE)


def load(
    run_dir: Path, config: dict[str, Any], fp: str
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The saved state if ``run_dir`` holds one made by the same config and model, else None.

    Raises:
        ArtifactError: the directory holds a run of a different config or model.
    """
    meta_path, state_path = run_dir / META_FILE, run_dir / STATE_FILE
    if not meta_path.exists() or not state_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("config") != config:
        diff = "\n  ".join(config_diff(meta.get("config", {}), config))
        raise ArtifactError(
            f"{run_dir} holds a run with a different config:\n  {diff}\n"
            "Use the saved values to resume it, or pass a new run_dir (or delete this one) to "
            "start afresh."
        )
    if meta.get("fingerprint") != fp:
        raise ArtifactError(
            f"{run_dir} holds a run of a different model checkpoint, dtype or data set "
            f"(fingerprint {meta.get('fingerprint')} != {fp}). Pass a new run_dir."
        )
    return load_file(str(state_path)), meta
