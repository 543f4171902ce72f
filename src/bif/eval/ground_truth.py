"""The retraining ground-truth artefact: subset masks and retrained query outputs, on disk.

Two files written side by side (each to a temporary name, then renamed; tensors first, so the
JSON never describes more than the tensors hold)::

    STEM.safetensors   masks [M, N] bool, targets [M, R, Q] float32 (NaN until trained),
                       seeds [M, R] int64, done [M, R] bool, query_accuracy [M, R] float32;
                       optionally token_targets [M, R, K] float32 (the loss of each sampled
                       query token) and token_index [K, 2] int64 (query, position)
    STEM.json          config (setting, recipe, α, M, R, seed, output, data hash) + provenance
                       (bif version, the command that regenerates it, wall time)

The safetensors metadata carries a hash of the JSON config, so files of two runs are never
mixed; with token targets the config also pins the token sample (``tokens``: its size and a hash
of ``token_index``), so a run asked for another sample refuses to resume. Artefacts without
token targets (all made before them) load with ``token_targets = token_index = None``.

The ground truth of each benchmark setting ships with bif under ``bif/bench/ground_truth/``
(:func:`load_ground_truth`); :mod:`bif.eval.retrain` makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from bif.bench.setting import Setting
from bif.config import config_diff
from bif.errors import ArtifactError

TENSORS = ("masks", "targets", "seeds", "done", "query_accuracy")
TOKEN_TENSORS = ("token_targets", "token_index")  # optional: per-token ground truth


@dataclass(frozen=True)
class GroundTruth:
    """Retrained query outputs on random subsets (see the module docstring for the files).

    Attributes:
        masks: ``[M, N]`` bool, subset membership of each training example.
        targets: ``[M, R, Q]`` float32 query outputs (NaN where ``done`` is False).
        seeds: ``[M, R]`` init (and minibatch-order) seed of every retrained model.
        done: ``[M, R]`` bool, which models have been trained.
        query_accuracy: ``[M, R]`` accuracy of each retrained model on the queries.
        config: what made it (compared on resume); meta: provenance (version, command, time).
        token_targets: ``[M, R, K]`` float32 loss of each sampled query token (NaN until
            trained), or None (no per-token ground truth).
        token_index: ``[K, 2]`` long ``(query, position)`` of each token column, or None.
    """

    masks: Tensor
    targets: Tensor
    seeds: Tensor
    done: Tensor
    query_accuracy: Tensor
    config: dict[str, Any]
    meta: dict[str, Any]
    token_targets: Tensor | None = None
    token_index: Tensor | None = None

    @property
    def has_tokens(self) -> bool:
        return self.token_targets is not None

    @property
    def setting(self) -> str:
        return self.config["setting"]

    @property
    def num_subsets(self) -> int:
        return self.masks.shape[0]

    @property
    def num_seeds(self) -> int:
        return self.targets.shape[1]

    @property
    def num_train(self) -> int:
        return self.masks.shape[1]

    @property
    def num_query(self) -> int:
        return self.targets.shape[2]

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def mean_targets(self) -> Tensor:
        """Query outputs averaged over the R seeds: ``[M, Q]`` (the LDS target)."""
        if not self.complete:
            raise ArtifactError(
                f"ground truth for {self.setting!r} is incomplete ({int(self.done.sum())}/"
                f"{self.done.numel()} models): rerun `{self.meta.get('command')}` to finish it."
            )
        return self.targets.mean(1)

    def mean_token_targets(self) -> Tensor:
        """Sampled query-token losses averaged over the R seeds: ``[M, K]``."""
        if self.token_targets is None:
            raise ArtifactError(
                f"ground truth for {self.setting!r} has no per-token targets; regenerate it with "
                "token targets (scripts/make_ground_truth.py ... --tokens 300)."
            )
        self.mean_targets()  # the completeness check
        return self.token_targets.mean(1)

    def check_setting(self, setting: Setting) -> None:
        """Raise :class:`ArtifactError` unless ``setting``'s data and recipe made this artefact."""
        expected = setting_config(setting)
        mine = {k: self.config.get(k) for k in expected}
        if mine != expected:
            diff = "\n  ".join(config_diff(flat(mine), flat(expected)))
            raise ArtifactError(
                f"ground truth {self.setting!r} was made from other data or another recipe than "
                f"the current setting:\n  {diff}\nRegenerate it: `{self.meta.get('command')}`."
            )

    @classmethod
    def load(cls, stem: str | Path) -> GroundTruth:
        """Read ``STEM.safetensors`` + ``STEM.json``."""
        st, js = paths(stem)
        if not st.is_file() or not js.is_file():
            raise ArtifactError(f"no ground truth at {st} + {js.name}.")
        doc = json.loads(js.read_text())
        with safe_open(str(st), framework="pt") as f:
            if f.metadata().get("config_sha") != _sha(doc["config"]):
                raise ArtifactError(f"{st} and {js} belong to different runs; regenerate them.")
            tensors = {k: f.get_tensor(k) for k in TENSORS}
            stored = set(f.keys())
            tensors.update({k: f.get_tensor(k) for k in TOKEN_TENSORS if k in stored})
        tokens = doc["config"].get("tokens")
        if (tokens is None) != ("token_index" not in tensors) or (
            tokens is not None and tokens != token_config(tensors["token_index"])
        ):
            raise ArtifactError(f"{st}'s token index does not match {js}'s config; regenerate.")
        return cls(**tensors, config=doc["config"], meta=doc["meta"])

    def save(self, stem: str | Path) -> None:
        """Write both files atomically (tensors first; the JSON never runs ahead of them)."""
        st, js = paths(stem)
        st.parent.mkdir(parents=True, exist_ok=True)
        names = TENSORS + (TOKEN_TENSORS if self.has_tokens else ())
        tensors = {k: getattr(self, k).contiguous() for k in names}
        save_file(tensors, str(st) + ".tmp", metadata={"config_sha": _sha(self.config)})
        os.chmod(str(st) + ".tmp", 0o644)  # safetensors writes 0600; shipped files must be readable
        doc = {"config": self.config, "meta": self.meta}
        Path(str(js) + ".tmp").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(str(st) + ".tmp", st)
        os.replace(str(js) + ".tmp", js)


def paths(stem: str | Path) -> tuple[Path, Path]:
    """``(STEM.safetensors, STEM.json)``; a path already ending in either suffix is its stem."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.parent / f"{stem.name}.safetensors", stem.parent / f"{stem.name}.json"


def token_config(index: Tensor) -> dict[str, Any]:
    """What pins a token sample ``[K, 2]`` in the config: its size and a hash of its values."""
    h = hashlib.sha256(index.to("cpu").long().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"num": int(index.shape[0]), "index_sha": h}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, so a diff names the exact recipe field that changed."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_hash(setting: Setting) -> str:
    """A short hash of the setting's training and query tensors."""
    h = hashlib.sha256()
    tensors: list[Tensor] = []
    for t in (setting.x_train, setting.y_train, setting.x_query, setting.y_query):
        # token batches (causal-lm) are dicts of tensors: hashed in key order
        tensors += [t[k] for k in sorted(t)] if isinstance(t, dict) else [t]
    for t in tensors:
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def setting_config(setting: Setting) -> dict[str, Any]:
    """The parts of an artefact's config that come from the setting (JSON-normalised)."""
    cfg = {"setting": setting.name, "data": data_hash(setting), "recipe": setting.recipe}
    return json.loads(json.dumps(cfg))


def shipped_ground_truths() -> list[str]:
    """Names of the ground truths that ship with bif."""
    folder = resources.files("bif.bench").joinpath("ground_truth")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_ground_truth(name: str) -> GroundTruth:
    """The shipped, complete ground truth of setting ``name`` (no data needed to load it).

    Raises:
        ArtifactError: no such artefact, or an incomplete one.
    """
    names = shipped_ground_truths()
    if name not in names:
        raise ArtifactError(
            f"no shipped ground truth {name!r} (have {names}); generate it with "
            f"`python scripts/make_ground_truth.py {name}`."
        )
    with resources.as_file(resources.files("bif.bench").joinpath("ground_truth")) as folder:
        gt = GroundTruth.load(Path(folder) / name)
    if not gt.complete:
        raise ArtifactError(f"shipped ground truth {name!r} is incomplete: {gt.meta['command']}")
    return gt
