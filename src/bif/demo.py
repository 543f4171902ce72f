"""The embedded default demo: a small MLP on the bundled 8×8 digits, attributed with BIF.

Everything is fixed and seeded with explicit generators (independent of ``torch.manual_seed``):
a 1,000 / 797 train/test split, a 64→64→10 ReLU MLP, and its training recipe (full-batch AdamW,
300 steps, ~97% test accuracy). :func:`run_demo` trains it, attributes a few test digits to the
1,000 training digits with the library's default hyperparameters, and writes::

    out_dir/report.html             the self-contained HTML report
    out_dir/result/                 the saved BIFResult (+ demo.json: split, queries, accuracy)

Queries (:func:`pick_queries`): up to half are misclassified test digits, the most confidently
wrong first (highest loss at w*); each is paired with a correctly classified test digit of the
same true label (the first in test order), so proponents of a right and a wrong answer sit side
by side. Remaining slots take correctly classified digits round-robin over the classes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bif.api import attribute
from bif.checkpoint import read_json, write_json
from bif.config import BIFConfig
from bif.datasets import Digits, load_digits
from bif.errors import ArtifactError, ConfigError
from bif.report import ExampleView, write_report
from bif.result import BIFResult

log = logging.getLogger(__name__)

SPLIT_SEED = 0
NUM_TRAIN = 1000
MODEL_SEED = 1
HIDDEN = 64
TRAIN_STEPS = 300
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-2
DEMO_FILE = "demo.json"


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed split. ``*_idx`` are indices into :func:`bif.datasets.load_digits`."""

    train_idx: Tensor  # [N]
    test_idx: Tensor  # [M]
    x_train: Tensor  # [N, 64] in [0, 1]
    y_train: Tensor  # [N]
    x_test: Tensor  # [M, 64]
    y_test: Tensor  # [M]


def split_digits(digits: Digits | None = None, seed: int = SPLIT_SEED) -> DigitsSplit:
    """First ``NUM_TRAIN`` digits of a seeded permutation for training, the rest for testing."""
    d = digits or load_digits()
    perm = torch.randperm(len(d.labels), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:NUM_TRAIN], perm[NUM_TRAIN:]
    x, y = d.features(), d.labels
    return DigitsSplit(tr, te, x[tr], y[tr], x[te], y[te])


def build_model(seed: int = MODEL_SEED) -> nn.Sequential:
    """64→HIDDEN→10 ReLU MLP, initialised like ``nn.Linear`` but from its own generator."""
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            bound = layer.in_features**-0.5  # PyTorch's default U(-1/sqrt(fan_in), ...)
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    return model


def train_model(model: nn.Module, x: Tensor, y: Tensor, steps: int = TRAIN_STEPS) -> nn.Module:
    """Full-batch AdamW on the cross-entropy (deterministic: no shuffling, no dropout).

    Args:
        x: inputs [N, 64]; y: labels [N]. Returns the model in eval mode.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted labels [M] and per-example cross-entropy [M] at the current weights."""
    logits = model(x)
    return logits.argmax(-1), F.cross_entropy(logits, y, reduction="none")


def check_num_queries(num_queries: int, num_test: int) -> None:
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ConfigError(f"num_queries must be a positive integer, got {num_queries!r}.")
    if num_queries > num_test:
        raise ConfigError(
            f"num_queries must be at most the test-set size {num_test}, got {num_queries}."
        )


def pick_queries(labels: Tensor, preds: Tensor, losses: Tensor, num_queries: int) -> list[int]:
    """Deterministic, informative test positions (the rule is in the module docstring).

    Args:
        labels, preds, losses: ``[M]`` true labels, predictions and losses of the test set.

    Returns:
        ``num_queries`` distinct positions into the test set.
    """
    m = len(labels)
    check_num_queries(num_queries, m)
    ok = (preds == labels).tolist()
    wrong = sorted((i for i in range(m) if not ok[i]), key=lambda i: -float(losses[i]))
    used: list[int] = []
    for w in wrong[: num_queries // 2]:
        same = (i for i in range(m) if ok[i] and labels[i] == labels[w] and i not in used)
        twin = next(same, None)
        used += [w] if twin is None else [twin, w]
    # Fill: correct digits ordered by (rank within their class, class), then leftover wrong ones.
    rank: dict[int, int] = {}
    keyed = []
    for i in range(m):
        if ok[i]:
            c = int(labels[i])
            rank[c] = rank.get(c, -1) + 1
            keyed.append((rank[c], c, i))
    fill = [i for _, _, i in sorted(keyed)] + wrong
    used += [i for i in fill if i not in used][: max(0, num_queries - len(used))]
    return used[:num_queries]


@dataclass(frozen=True)
class DemoQuery:
    position: int  # index into the test split
    dataset_index: int  # index into load_digits()
    label: int
    prediction: int
    loss: float  # cross-entropy at w*


@dataclass(frozen=True)
class DemoOutput:
    """What ``bif demo`` prints: where things were written, the model's quality, the result."""

    out_dir: Path
    report_path: Path
    result_dir: Path
    result: BIFResult
    queries: list[DemoQuery]
    train_labels: list[int]
    train_accuracy: float
    test_accuracy: float
    num_test: int
    train_seconds: float
    wall_seconds: float


@contextlib.contextmanager
def torch_threads(num: int | None) -> Iterator[None]:
    """Temporarily use ``num`` CPU threads (None: leave torch's setting alone)."""
    if num is None:
        yield
        return
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ConfigError(f"threads must be a positive integer, got {num!r}.")
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    out_dir: str | Path,
    num_queries: int = 6,
    progress: bool = True,
    *,
    k: int = 5,
    threads: int | None = None,
    **hyperparams: Any,
) -> DemoOutput:
    """Train the digits MLP, attribute ``num_queries`` test digits, save the result and report.

    Args:
        out_dir: output directory (created); see the module docstring for its layout.
        num_queries: number of test digits to explain (see :func:`pick_queries`).
        progress: show the sampler's progress bar.
        k: proponents/opponents per query in the report.
        threads: torch CPU threads while the demo runs (None: torch's default).
        **hyperparams: :class:`BIFConfig` fields overriding the library defaults.
    """
    t0 = time.perf_counter()
    cfg = BIFConfig().replace(**hyperparams)  # validate before spending time on training
    split = split_digits()
    check_num_queries(num_queries, len(split.test_idx))
    out_dir = Path(out_dir)
    with torch_threads(threads):
        model = train_model(build_model(), split.x_train, split.y_train)
        train_seconds = time.perf_counter() - t0
        train_pred, _ = predict(model, split.x_train, split.y_train)
        test_pred, test_loss = predict(model, split.x_test, split.y_test)
        train_acc = float((train_pred == split.y_train).double().mean())
        test_acc = float((test_pred == split.y_test).double().mean())
        log.info("demo MLP trained in %.1f s: test accuracy %.3f", train_seconds, test_acc)
        pos = pick_queries(split.y_test, test_pred, test_loss, num_queries)
        q = torch.tensor(pos, dtype=torch.long)
        result = attribute(
            model, (split.x_train, split.y_train), (split.x_test[q], split.y_test[q]),
            task="classification", config=cfg, progress=progress,
        )  # fmt: skip
    queries = [
        DemoQuery(
            i, int(split.test_idx[i]), int(split.y_test[i]), int(test_pred[i]), float(test_loss[i])
        )
        for i in pos
    ]
    result_dir = result.save(out_dir / "result")
    info = {
        "dataset": "digits",
        "split_seed": SPLIT_SEED,
        "model": f"MLP 64-{HIDDEN}-10 ReLU, seed {MODEL_SEED}",
        "training": f"full-batch AdamW lr={LEARNING_RATE} wd={WEIGHT_DECAY}, {TRAIN_STEPS} steps",
        "train_indices": split.train_idx.tolist(),
        "queries": [vars(x) for x in queries],
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "num_test": len(split.test_idx),
        "train_seconds": train_seconds,
    }
    write_json(result_dir / DEMO_FILE, info)
    report = write_demo_report(result_dir, out_dir / "report.html", k=k)
    return DemoOutput(
        out_dir=out_dir,
        report_path=report,
        result_dir=result_dir,
        result=result,
        queries=queries,
        train_labels=split.y_train.tolist(),
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        num_test=len(split.test_idx),
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - t0,
    )


def load_demo_info(result_dir: str | Path) -> dict[str, Any] | None:
    """The demo's ``demo.json`` next to a saved result, or None for a result of another run."""
    path = Path(result_dir) / DEMO_FILE
    if not path.exists():
        return None
    return read_json(path, f"Run `bif demo --out {Path(result_dir).parent}` again to rebuild it.")


def demo_views(info: dict[str, Any]) -> tuple[list[ExampleView], list[ExampleView]]:
    """Train and query views (digit image + labels) rebuilt from ``demo.json`` and the dataset."""
    d = load_digits()
    img = lambda i: d.images[i].float() / 16.0  # noqa: E731
    train = [ExampleView(f"label {int(d.labels[i])}", image=img(i)) for i in info["train_indices"]]
    query = [
        ExampleView(
            f"test #{x['dataset_index']}: true {x['label']}, predicted {x['prediction']}",
            image=img(x["dataset_index"]),
            tags=("correct",) if x["label"] == x["prediction"] else ("misclassified",),
        )
        for x in info["queries"]
    ]
    return train, query


def write_demo_report(result_dir: str | Path, path: str | Path, k: int = 5) -> Path:
    """(Re)build the demo's HTML report from its saved result directory only."""
    info = load_demo_info(result_dir)
    if info is None:
        raise ArtifactError(f"{result_dir} holds no {DEMO_FILE}: it was not written by `bif demo`.")
    # The page is built from the files on disk, so a saved demo can always be re-rendered.
    result = BIFResult.load(result_dir)
    train, query = demo_views(info)
    extra = {
        "demo model": info["model"],
        "demo training": info["training"],
        "demo train accuracy": info["train_accuracy"],
        "demo test accuracy": f"{info['test_accuracy']:.4f} on {info['num_test']} test digits",
        "demo training seconds": info["train_seconds"],
    }
    return write_report(
        path, result, train, query, k=k, title="bif demo: digits MLP", extra_meta=extra
    )
