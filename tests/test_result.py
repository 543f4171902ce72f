"""BIFResult: save/load round trip and the proponent/opponent ranking of ``top``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import bif
from bif.errors import ArtifactError
from bif.result import META_FILE, TENSORS_FILE

N, Q, DIN, K = 10, 3, 4, 3


@pytest.fixture(scope="module")
def result() -> bif.BIFResult:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIN, 5), nn.Tanh(), nn.Linear(5, K)).eval()
    x, y = torch.randn(N, DIN, generator=g), torch.randint(0, K, (N,), generator=g)
    xq, yq = torch.randn(Q, DIN, generator=g), torch.randint(0, K, (Q,), generator=g)
    return bif.attribute(
        model, (x, y), (xq, yq), num_chains=2, num_draws=5, num_burnin=3, thin=1,
        step_size=1e-3, nbeta=10.0, gamma=100.0, sampler="rmsprop", batch_size=4,
        progress=False,
    )  # fmt: skip


def synthetic(scores: torch.Tensor) -> bif.BIFResult:
    q, n = scores.shape
    z = torch.zeros
    return bif.BIFResult(
        scores=scores, stderr=0.1 * scores.abs(), correlation=z(q, n), self_influence=z(n),
        self_influence_stderr=z(n), draw_loss=z(2, 3), step_loss=z(2, 4), query_trace=z(2, 3, q),
        train_loss_star=z(n), query_star=z(q), config=bif.BIFConfig(),
    )  # fmt: skip


def test_save_load_round_trip(result: bif.BIFResult, tmp_path) -> None:
    path = result.save(tmp_path / "res")
    assert (path / TENSORS_FILE).exists() and (path / META_FILE).exists()
    loaded = bif.BIFResult.load(path)
    for name in bif.BIFResult._TENSORS:
        a, b = getattr(result, name), getattr(loaded, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert loaded.config == result.config
    assert loaded.config.sampler == "rmsprop" and loaded.config.batch_size == 4
    assert loaded.meta == result.meta
    assert loaded.meta["bif_version"] == bif.__version__
    assert "torch_version" in loaded.meta and loaded.meta["num_train"] == N
    # A saved result loads again to the same thing (the format is stable under re-saving).
    again = bif.BIFResult.load(loaded.save(tmp_path / "res2"))
    assert torch.equal(again.scores, result.scores) and again.meta == result.meta


def test_saved_meta_is_readable_json(result: bif.BIFResult, tmp_path) -> None:
    meta = json.loads((result.save(tmp_path) / META_FILE).read_text())
    assert meta["config"]["num_chains"] == 2 and meta["meta"]["bif_version"] == bif.__version__


def test_load_rejects_non_result(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="is not a saved BIF result"):
        bif.BIFResult.load(tmp_path)


def test_load_rejects_unknown_config_field(result: bif.BIFResult, tmp_path) -> None:
    path = result.save(tmp_path)
    meta = json.loads((path / META_FILE).read_text())
    meta["config"]["temperature"] = 1.0
    (path / META_FILE).write_text(json.dumps(meta))
    # A result from another bif version (or edited by hand) is refused with the field named.
    with pytest.raises(ArtifactError, match=r"unknown config field\(s\) \['temperature'\]"):
        bif.BIFResult.load(path)


def test_top_orders_proponents_and_opponents() -> None:
    scores = torch.tensor(
        [
            [0.3, -0.5, 0.0, -0.1, 0.9, -2.0, 0.2],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # no proponent at all
        ],
        dtype=torch.float64,
    )
    r = synthetic(scores)
    top = r.top(0, k=2)
    assert top.query == 0
    assert [p.index for p in top.proponents] == [5, 1]  # most negative first
    assert [p.index for p in top.opponents] == [4, 0]  # most positive first
    assert top.proponents[0].score == -2.0 and top.proponents[0].stderr == pytest.approx(0.2)
    # k larger than what exists: every negative score, sorted; zero is neither.
    big = r.top(0, k=100)
    assert [p.index for p in big.proponents] == [5, 1, 3]
    assert [p.index for p in big.opponents] == [4, 0, 6]
    none = r.top(1, k=3)
    assert none.proponents == [] and [o.index for o in none.opponents] == [6, 5, 4]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(bif.ConfigError, match="k must be a positive integer"):
            r.top(0, k=bad)
    text = str(top)
    assert "proponents" in text and "opponents" in text and "#5" in text


def test_top_on_real_result(result: bif.BIFResult) -> None:
    for q in range(Q):
        row = result.scores[q]
        top = result.top(q, k=3)
        pro = [p.score for p in top.proponents]
        opp = [o.score for o in top.opponents]
        assert pro == sorted(pro) and opp == sorted(opp, reverse=True)
        assert all(s < 0 for s in pro) and all(s > 0 for s in opp)
        if pro:
            assert pro[0] == float(row.min())
        if opp:
            assert opp[0] == float(row.max())
        for p in top.proponents:
            assert math.isclose(p.stderr, float(result.stderr[q, p.index]))


@pytest.mark.parametrize("q", [-1, Q])
def test_top_rejects_bad_query(result: bif.BIFResult, q: int) -> None:
    with pytest.raises(IndexError, match=r"query index .* out of range"):
        result.top(q)
