"""Retraining ground truth for the LDS: query outputs of models retrained on random subsets.

:func:`run_retraining` draws M subsets of ``round(α·N)`` training examples, trains each on R seeds
and records every query's output (its cross-entropy by default) into a
:class:`~bif.eval.ground_truth.GroundTruth` artefact (masks, targets, seeds, done-mask, config
and provenance; see that module for the files).

Models are trained ``models_per_batch`` at a time (the setting's batched trainer, or its
``retrain_outputs`` loop where it has one, as the language-model setting does) and the artefact
is rewritten after each batch, so a killed run loses only the batch in flight and a rerun with
the same arguments resumes; different arguments raise :class:`~bif.errors.ArtifactError` with a
diff. Batches are fixed slices of the (m, r) pairs in row-major order, so a resumed run trains
exactly the batches an uninterrupted one would and gives the identical artefact.

With ``tokens`` (a ``[K, 2]`` sample of query tokens,
:func:`bif.bench.lm.setting.token_sample`) a setting with ``retrain_token_outputs`` (causal-lm)
also records each sampled token's loss (``token_targets`` ``[M, R, K]``) for the token-level
LDS; the sample is pinned in the config, so a rerun with another sample refuses to resume.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import bif
from bif.bench.setting import Setting
from bif.bench.training import batched_logits
from bif.config import config_diff
from bif.errors import ArtifactError, ConfigError
from bif.eval.ground_truth import (
    GroundTruth,
    flat,
    load_ground_truth,
    paths,
    setting_config,
    shipped_ground_truths,
    token_config,
)

__all__ = [
    "GroundTruth",
    "load_ground_truth",
    "make_subsets",
    "query_outputs",
    "run_retraining",
    "shipped_ground_truths",
    "train_reference",
]

log = logging.getLogger(__name__)

OUTPUTS = ("loss", "margin")


def make_subsets(
    num_train: int, alpha: float, num_subsets: int, num_seeds: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Subset masks ``[M, N]`` bool (each ``round(α·N)`` examples) and model seeds ``[M, R]``."""
    k = round(alpha * num_train)
    if not 0 < k < num_train:
        raise ConfigError(f"alpha={alpha} leaves {k} of {num_train} examples; use 0 < alpha < 1.")
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    for m in range(num_subsets):
        masks[m, torch.randperm(num_train, generator=gen)[:k]] = True
    seeds = torch.randint(0, 2**31 - 1, (num_subsets, num_seeds), generator=gen)
    return masks, seeds


def query_outputs(logits: Tensor, y: Tensor, output: str) -> Tensor:
    """Per-query output ``[..., Q]`` from logits ``[..., Q, C]``: cross-entropy or margin."""
    if output == "loss":
        return F.cross_entropy(logits.movedim(-1, 1), y.expand(logits.shape[:-1]), reduction="none")
    right = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.expand(logits.shape[:-1]).unsqueeze(-1), float("-inf"))
    return right - others.amax(-1)


def run_retraining(
    setting: Setting,
    path: str | Path,
    *,
    alpha: float = 0.5,
    num_subsets: int = 100,
    num_seeds: int = 3,
    seed: int = 0,
    output: str = "loss",
    tokens: Tensor | None = None,
    models_per_batch: int = 50,
    max_batches: int | None = None,
    command: str | None = None,
    progress: bool = True,
) -> GroundTruth:
    """Train ``num_subsets × num_seeds`` models on random subsets; resume what ``path`` holds.

    Args:
        setting: data, model and recipe (:func:`bif.bench.settings.load_setting`).
        path: artefact stem (``.safetensors`` / ``.json`` are appended).
        alpha: subset fraction; num_subsets: M; num_seeds: R; seed: draws subsets and seeds.
        output: "loss" (query cross-entropy; causal-lm: the query's sequence loss) or "margin"
            (true logit minus the best other).
        tokens: ``[K, 2]`` long ``(query, position)`` of query tokens whose losses are recorded
            too (settings with ``retrain_token_outputs`` only); None: sequence outputs only.
        models_per_batch: models trained at once (and lost at most on a kill).
        max_batches: stop after this many batches (None: until done); the artefact stays
            resumable.
        command: the shell command that regenerates the artefact (stored with it).

    Returns:
        The ground truth, complete unless ``max_batches`` stopped it early.

    Raises:
        ArtifactError: ``path`` holds an artefact made with other arguments or another setting.
    """
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}.")
    if setting.retrain_outputs is not None and output != "loss":
        raise ConfigError(
            f"setting {setting.name!r} records the query loss only; use output='loss'."
        )
    if tokens is not None:
        if setting.retrain_token_outputs is None:
            raise ConfigError(f"setting {setting.name!r} records no per-token losses.")
        tokens = torch.as_tensor(tokens).long()
        if tokens.dim() != 2 or tokens.shape[1] != 2 or tokens.shape[0] < 1:
            raise ConfigError(
                f"tokens must be [K, 2] (query, position), got {tuple(tokens.shape)}."
            )
    for name, v in (("num_subsets", num_subsets), ("num_seeds", num_seeds),
                    ("models_per_batch", models_per_batch)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
    config = {
        **setting_config(setting),
        "alpha": alpha,
        "num_subsets": num_subsets,
        "num_seeds": num_seeds,
        "seed": seed,
        "output": output,
        "models_per_batch": models_per_batch,  # fixes the batch boundaries (exact resume)
    }
    if tokens is not None:  # only then: configs of sequence-only runs stay as they were
        config["tokens"] = token_config(tokens)
    config = json.loads(json.dumps(config))
    gt = _open(path, config, setting, command, tokens)
    pairs = [(m, r) for m in range(num_subsets) for r in range(num_seeds)]
    bar = tqdm(total=len(pairs), initial=int(gt.done.sum()), disable=not progress,
               desc=f"retrain {setting.name}", unit="model")  # fmt: skip
    batches = 0
    for start in range(0, len(pairs), models_per_batch):
        todo = [(m, r) for m, r in pairs[start : start + models_per_batch] if not gt.done[m, r]]
        if not todo:
            continue
        if max_batches is not None and batches >= max_batches:
            break
        t0 = time.perf_counter()
        ms, rs = torch.tensor([p[0] for p in todo]), torch.tensor([p[1] for p in todo])
        idx = torch.stack([gt.masks[m].nonzero().squeeze(1) for m in ms.tolist()])  # [B, K]
        if tokens is not None:
            assert gt.token_targets is not None and setting.retrain_token_outputs is not None
            gt.targets[ms, rs], gt.query_accuracy[ms, rs], gt.token_targets[ms, rs] = (
                setting.retrain_token_outputs(idx, gt.seeds[ms, rs], tokens)
            )
        elif setting.retrain_outputs is not None:  # e.g. causal-lm: its own loop and output
            gt.targets[ms, rs], gt.query_accuracy[ms, rs] = setting.retrain_outputs(
                idx, gt.seeds[ms, rs]
            )
        else:
            module, params = setting.train_batched(idx, gt.seeds[ms, rs])  # type: ignore[misc]
            logits = batched_logits(module, params, setting.x_query)  # [B, Q, C]
            gt.targets[ms, rs] = query_outputs(logits, setting.y_query, output).float()
            gt.query_accuracy[ms, rs] = (logits.argmax(-1) == setting.y_query).float().mean(-1)
        gt.done[ms, rs] = True
        gt.meta["wall_seconds"] += time.perf_counter() - t0
        gt.meta["complete"] = gt.complete
        gt.save(path)
        batches += 1
        bar.update(len(todo))
    bar.close()
    return gt


def _open(
    path: str | Path,
    config: dict[str, Any],
    setting: Setting,
    command: str | None,
    tokens: Tensor | None = None,
) -> GroundTruth:
    st, js = paths(path)
    if st.is_file() and js.is_file():
        gt = GroundTruth.load(path)
        if gt.config != config:
            diff = "\n  ".join(config_diff(flat(gt.config), flat(config)))
            raise ArtifactError(
                f"{st} holds ground truth made with other arguments:\n  {diff}\n"
                "Rerun with the saved arguments to resume it, or choose another path (or delete "
                "the two files) to start afresh."
            )
        log.info("resuming %s: %d/%d models done", st, int(gt.done.sum()), gt.done.numel())
        return gt
    masks, seeds = make_subsets(
        setting.num_train, config["alpha"], config["num_subsets"], config["num_seeds"],
        config["seed"],
    )  # fmt: skip
    m, r, q = config["num_subsets"], config["num_seeds"], setting.num_query
    meta = {
        "bif_version": bif.__version__,
        "torch_version": torch.__version__,
        "command": command or f"run_retraining(load_setting({setting.name!r}), {str(path)!r}, ...)",
        "wall_seconds": 0.0,
        "complete": False,
    }
    return GroundTruth(
        masks=masks,
        targets=torch.full((m, r, q), float("nan")),
        seeds=seeds,
        done=torch.zeros(m, r, dtype=torch.bool),
        query_accuracy=torch.full((m, r), float("nan")),
        config=config,
        meta=meta,
        token_targets=None if tokens is None else torch.full((m, r, len(tokens)), float("nan")),
        token_index=tokens,
    )


# --- the full-data reference model ---------------------------------------------------------


def train_reference(setting: Setting, seed: int | None = None) -> nn.Module:
    """The model attribution methods explain: the recipe on all N examples (eval mode)."""
    s = setting.reference_seed if seed is None else seed
    return setting.train(setting.build_model(s), setting.x_train, setting.y_train, s)
