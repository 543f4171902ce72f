"""EK-FAC influence functions through kronfluence (Grosse et al. 2023), the paper's main peer.

kronfluence approximates the Gauss-Newton Hessian of the MEAN training loss layer by layer
(Kronecker factors, eigenvalue-corrected for EK-FAC) on ``nn.Linear`` and ``nn.Conv2d``
modules only, and scores ``∇f_qᵀ (G + λI)⁻¹ ∇ℓ_n`` with f the query's measurement (here its
loss). Its positive score means "training on n lowers the query loss" (helpful), so the adapter
negates; the sign was verified against a hand-computed exact damped influence function (see
tests/test_peers.py). kronfluence's files go to a temporary directory that is removed afterwards.

Install: ``make compare-install`` (``pip install --no-deps kronfluence`` plus its runtime needs:
its torchvision requirement would pull a CUDA build of torch, and it never imports torchvision).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from bif.baselines import lm_methods
from bif.baselines.base import AttributionContext
from bif.baselines.peers import (
    bif_scores,
    check_context,
    is_classification,
    non_negative,
    positive_int,
    require,
    resolve_task,
    seeded,
)
from bif.errors import ConfigError
from bif.task import RegressionTask, Task, forward

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def _make_task(base: type, task: Task, seed: int) -> Any:
    """A kronfluence ``Task`` for bif's per-sample loss: summed training loss, query-loss measure.

    The training loss is SUMMED over the batch because kronfluence reads per-sample gradients off
    one backward pass. ``sample=True`` (true Fisher) draws targets from the model's predictive
    distribution: categorical for classification, unit Gaussian around the output for ½‖f-y‖².
    """
    classification = is_classification(task)
    regression = isinstance(task, RegressionTask)
    generator = torch.Generator().manual_seed(seed)

    def summed_loss(out: Any, x: Any, y: Tensor) -> Tensor:
        # bif's Task takes a model function: hand it the outputs already computed, since a
        # second forward pass would be recorded twice by kronfluence's module hooks.
        return task.loss(lambda _: out, (x, y.long() if classification else y)).sum()

    class BIFTask(base):  # type: ignore[misc, valid-type]
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            out = forward(model, x)
            if not sample:
                return summed_loss(out, x, y)
            with torch.no_grad():
                if classification:
                    probs = F.softmax(out.detach().double(), dim=-1).cpu()
                    target = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                elif regression:
                    target = out.detach() + torch.randn(
                        out.shape, generator=generator, dtype=out.dtype
                    ).to(out.device)
                else:
                    raise ConfigError(
                        "EK-FAC's true Fisher samples targets, which bif can do for the built-in "
                        "tasks only; use EKFAC(use_empirical_fisher=True) with a custom task."
                    )
            return summed_loss(out, x, target.to(out.device))

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch
            return summed_loss(forward(model, x), x, y)

    return BIFTask()


class EKFAC:
    """EK-FAC (or K-FAC / diagonal) influence via kronfluence.

    Args:
        damping: λ added to the curvature's eigenvalues (mean-loss scale, like bif's other
            influence functions); None = kronfluence's heuristic, 0.1 × mean eigenvalue.
        strategy: "ekfac", "kfac", "diagonal" or "identity".
        use_empirical_fisher: True = curvature from the observed labels; False (kronfluence's
            default) = the true Fisher, with targets sampled from the model.
        batch_size: examples per batch when fitting factors and scoring training examples.
        query_batch_size: queries per batch.
        seed: seed of the sampled targets.
    """

    def __init__(
        self,
        damping: float | None = None,
        strategy: str = "ekfac",
        use_empirical_fisher: bool = False,
        batch_size: int = 256,
        query_batch_size: int = 64,
        seed: int = 0,
        name: str = "ekfac",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown EK-FAC strategy {strategy!r}; use one of {STRATEGIES}.")
        self.damping = None if damping is None else non_negative(damping, "damping")
        self.strategy = strategy
        self.use_empirical_fisher = bool(use_empirical_fisher)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.query_batch_size = positive_int(query_batch_size, "query_batch_size")
        self.seed = seed
        self.name = name

    def token_scores(self, ctx: AttributionContext, tokens: Tensor) -> Tensor:
        """``[K, N]`` with one measurement (the token's loss) per sampled query token
        ``tokens[k] = (query, position)``; causal-lm only. UNTESTED here (no kronfluence)."""
        require("kronfluence", "EK-FAC")
        if not lm_methods.is_lm_context(ctx):
            raise ConfigError("per-token EK-FAC scores need a causal-lm context.")
        from bif.baselines.lm_tokens import ekfac_token_scores

        return ekfac_token_scores(self, ctx, tokens)

    def scores(self, ctx: AttributionContext) -> Tensor:
        """Scores ``[Q, N]`` (negative = training on n lowers query q's loss)."""
        require("kronfluence", "EK-FAC")
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.module.tracked_module import TrackedModule
        from kronfluence.task import Task as KronTask

        if lm_methods.is_lm_context(ctx):  # token batches: the LM adapter
            return lm_methods.ekfac_scores(self, ctx)
        q, n = check_context(ctx)
        task = _make_task(KronTask, resolve_task(ctx), self.seed)
        # prepare_model freezes the parameters and wraps modules in place: work on a copy.
        model = prepare_model(copy.deepcopy(ctx.model), task)
        if not any(isinstance(m, TrackedModule) for m in model.modules()):
            raise ConfigError("EK-FAC (kronfluence) supports nn.Linear and nn.Conv2d layers only.")
        device = next(model.parameters()).device
        train = TensorDataset(ctx.x_train, ctx.y_train)
        query = TensorDataset(ctx.x_query, ctx.y_query)
        factor_args = FactorArguments(
            strategy=self.strategy, use_empirical_fisher=self.use_empirical_fisher
        )
        score_args = ScoreArguments(damping_factor=self.damping)
        with (
            tempfile.TemporaryDirectory(prefix="bif-kronfluence-") as out_dir,
            seeded(self.seed),
            warnings.catch_warnings(),
        ):
            # kronfluence 1.0.1 builds a (disabled) torch.cuda.amp.GradScaler even on the CPU.
            warnings.filterwarnings("ignore", message=".*torch.cuda.amp.GradScaler")
            analyzer = Analyzer(
                analysis_name="bif",
                model=model,
                task=task,
                cpu=device.type == "cpu",
                log_level=logging.WARNING,
                disable_tqdm=True,
                output_dir=out_dir,
            )
            analyzer.fit_all_factors(
                factors_name=self.strategy,
                dataset=train,
                per_device_batch_size=min(self.batch_size, n),
                factor_args=factor_args,
            )
            analyzer.compute_pairwise_scores(
                scores_name="pairwise",
                factors_name=self.strategy,
                query_dataset=query,
                train_dataset=train,
                per_device_query_batch_size=min(self.query_batch_size, q),
                per_device_train_batch_size=min(self.batch_size, n),
                score_args=score_args,
            )
            raw = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # [Q, N]
        # Positive kronfluence score = helpful (training on n lowers the query loss): negate.
        return bif_scores(raw, q, n, "EK-FAC", negate=True)
