"""The ceiling of the BIF's Gaussian limit: damped influence functions on a benchmark setting.

For a curvature C, the Hessian H of the mean training loss L_n at w* or its Gauss-Newton matrix
G = (1/n) Σ_t J_tᵀ (diag p_t - p_t p_tᵀ) J_t, and dampings λ = λ_max(C)/{10, ..., 3000}::

    IF[q, n] = -∇f_q(w*)ᵀ (C + λI)⁻¹ ∇l_n(w*)        [Q, N], negative = proponent

(the sign and scale of :mod:`bif.baselines.influence`). For C = H this is nβ × the BIF of the
Gaussian posterior N(w*, (nβH + γI)⁻¹) at λ = γ/nβ (BIF_NOTES.md §2): the best the BIF's
Gaussian limit can do. Each row is scored by the setting's LDS (:func:`bif.eval.metrics.lds`).

Solver: P is far too large for a dense Hessian on the LM, so each curvature gets ONE block
Krylov space started from the Q query gradients (block Lanczos with full reorthogonalisation:
block CG for every damping at once, since Krylov spaces are shift invariant). The Galerkin
solution is exact in the space also where C + λI is indefinite, and its residual is known in
closed form (``Krylov.solve``). Ritz values give λ_max and, by interlacing, a lower bound on the
number of Hessian eigenvalues below -λ. The library's ``batched_cg`` is run as a twin on a few
queries. Run: ``python -m bif.bench.ceiling [--setting shakespeare] [--steps 15]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

F64 = torch.float64
Op = Callable[[Tensor], Tensor]  # v [P] -> C v [P]
FRACTIONS = (10, 30, 100, 300, 1000, 3000)


def flat(params: dict[str, Tensor]) -> Tensor:
    """Tensors concatenated into one vector ``[P]`` (dict order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(w: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`flat`: ``[P]`` split into tensors shaped like ``like``."""
    sizes = [p.numel() for p in like.values()]
    return {k: x.view(p.shape) for (k, p), x in zip(like.items(), w.split(sizes), strict=True)}


def hessian_op(loss_fn: Callable[[Tensor], Tensor], w: Tensor) -> Op:
    """``v [P] -> ∇²loss(w) v`` by reverse-over-reverse autograd on one cached graph."""
    leaf = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(leaf), leaf, create_graph=True)

    def op(v: Tensor) -> Tensor:
        return torch.autograd.grad(g, leaf, v, retain_graph=True)[0].detach()

    return op


def gn_op(logits_fn: Callable[[Tensor], Tensor], w: Tensor, weight: float) -> Op:
    """``v [P] -> weight · Jᵀ (diag p - ppᵀ) J v``: the Gauss-Newton matrix of ``weight · Σ_t
    CE(z_t, y_t)`` for logits ``z = logits_fn(w)`` ``[T, V]`` with Jacobian J ``[T·V, P]``.

    J v is the derivative in u of the (linear in u) vector-Jacobian product Jᵀu."""
    leaf = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = logits_fn(leaf)
        u = torch.zeros_like(z, requires_grad=True)
        (jtu,) = torch.autograd.grad(z, leaf, u, create_graph=True)
    p = torch.softmax(z.detach(), -1)

    def op(v: Tensor) -> Tensor:
        (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
        hj = p * jv - p * (p * jv).sum(-1, keepdim=True)
        return weight * torch.autograd.grad(z, leaf, hj, retain_graph=True)[0].detach()

    return op


@dataclass
class Krylov:
    """An orthonormal basis ``V [m, P]`` of span{B, CB, ..., C^(s-1)B} for rows B ``[K, P]``.

    Attributes:
        basis: V, m = K·s rows.
        t: ``V C Vᵀ`` ``[m, m]`` (symmetrised).
        start: ``[m, K]`` coordinates of the right-hand sides (``B = startᵀ V``).
        couple: ``[K, K]`` R of ``C V_lastᵀ - Vᵀ T[:, last] = Q_next R`` (the residuals).
        hvps, seconds: cost of building it.
    """

    basis: Tensor
    t: Tensor
    start: Tensor
    couple: Tensor
    hvps: int
    seconds: float

    def ritz(self) -> Tensor:
        """Ritz values ``[m]`` (ascending): interlace C's eigenvalues from inside."""
        return torch.linalg.eigvalsh(self.t)

    def solve(self, shift: float) -> tuple[Tensor, Tensor]:
        """Galerkin solutions of ``(C + shift·I) x_k = b_k``: coordinates ``Y [m, K]`` (x_k =
        Vᵀ Y[:, k]) and relative residuals ``||b_k - (C + shift) x_k|| / ||b_k||`` ``[K]``."""
        k = self.start.shape[1]
        eye = torch.eye(self.t.shape[0], dtype=self.t.dtype)
        y = torch.linalg.solve(self.t + shift * eye, self.start)
        return y, (self.couple @ y[-k:]).norm(dim=0) / self.start.norm(dim=0)


def block_krylov(op: Op, b: Tensor, steps: int, log: Callable[[str], None] | None = None) -> Krylov:
    """Block Arnoldi (= block Lanczos, C symmetric) with two Gram-Schmidt passes against the
    whole basis, ``steps`` blocks (capped at P // K); ``b`` ``[K, P]``, ``op`` applied per row."""
    t0 = time.perf_counter()
    k, p = b.shape
    steps = max(1, min(steps, p // k))
    m = k * steps
    basis = torch.zeros(m, p, dtype=F64)
    t = torch.zeros(m, m, dtype=F64)
    q, r0 = torch.linalg.qr(b.to(F64).T)  # [P, K], [K, K]
    basis[:k] = q.T
    couple = torch.zeros(k, k, dtype=F64)
    for j in range(steps):
        cols = slice(j * k, (j + 1) * k)
        w = torch.stack([op(v) for v in basis[cols]]).to(F64)  # [K, P] = (C Q_j)ᵀ
        done = basis[: (j + 1) * k]
        for _ in range(2):  # twice is enough
            c = done @ w.T  # [(j+1)K, K]
            t[: (j + 1) * k, cols] += c
            w = w - c.T @ done
        q = torch.linalg.qr(w.T)[0]
        for _ in range(2):  # a rank-deficient block: keep Q's spare columns out of the basis
            q = torch.linalg.qr(q - done.T @ (done @ q))[0]
        rr = q.T @ w.T  # w = (q rr)ᵀ, w being orthogonal to the basis
        if j + 1 < steps:
            basis[(j + 1) * k : (j + 2) * k] = q.T
            t[(j + 1) * k : (j + 2) * k, cols] = rr
        else:
            couple = rr
        if log is not None:
            log(f"  block {j + 1}/{steps}: {time.perf_counter() - t0:.0f} s")
    start = torch.zeros(m, k, dtype=F64)
    start[:k] = r0
    t = 0.5 * (t + t.T)  # Arnoldi's V C Vᵀ, symmetric up to rounding
    return Krylov(basis, t, start, couple, m, time.perf_counter() - t0)


def krylov_scores(kry: Krylov, shift: float, projected: Tensor) -> tuple[Tensor, Tensor]:
    """``IF [K, N] = -∇f_kᵀ (C + shift)⁻¹ ∇l_n`` from the projected train gradients
    ``V ∇l_nᵀ`` ``[m, N]``, and the relative residuals ``[K]`` of the K solves."""
    y, res = kry.solve(shift)
    return -(y.T @ projected), res


# --- the language-model problem --------------------------------------------------------------


def lm_logits(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Callable, Tensor, Tensor]:
    """``(w [P] -> logits [T, V], w* [P], targets [T])`` for the T attributed next-token
    predictions of an encoded batch, exactly as :class:`CausalLMTask` forwards it (trimmed to
    the longest sequence, attention mask passed), without its float32 cast of the logits."""
    from torch.func import functional_call

    like = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    attn = batch["attention_mask"].bool()
    keep = batch.get("loss_mask", batch["attention_mask"]).bool() & attn
    length = max(int(attn.sum(1).max()), 2)
    ids = torch.where(attn, batch["input_ids"], 0)[:, :length]
    sel = keep[:, 1:length]  # position 0 is never attributed

    def fn(w: Tensor) -> Tensor:
        kw = {"input_ids": ids, "attention_mask": attn[:, :length].long()}
        return functional_call(model, unflat(w, like), (), kw).logits[:, :-1][sel]

    return fn, flat(like), ids[:, 1:][sel]


def auto_rules(setting: Any, model: nn.Module) -> dict[str, Any]:
    """nβ, γ and damping γ/nβ that the library's 'auto' rules (:func:`bif.auto.resolve_auto`,
    no sampling, no pilot) give the benchmark's BIF options on ``setting`` and the defaults."""
    from bif.auto import KMIN_FLOOR, resolve_auto
    from bif.bench.runner import method_options_for
    from bif.config import BIFConfig
    from bif.data import DataSource
    from bif.functional import FunctionalModel
    from bif.lm.task import CausalLMTask  # the task bif's own LM paths use

    opts = method_options_for(setting.name, None).get("bif", {})
    fm = FunctionalModel(model.eval(), "cpu")
    src = DataSource(setting.x_train, "train", "cpu", torch.float32)
    out: dict[str, Any] = {}
    for label, cfg in (("bench", BIFConfig().replace(**opts)), ("default", BIFConfig())):
        res, curv = resolve_auto(cfg, fm, CausalLMTask(), src)
        info = {k: v for k, v in curv.info.items() if isinstance(v, int | float)}
        if "condition_lowered_to" in info:  # nβ was set so that 1 + nβ·μ/γ = KMIN_FLOOR
            info["negative_eigenvalue"] = -(1 - KMIN_FLOOR) * float(res.gamma) / float(res.nbeta)
        out[label] = {"nbeta": float(res.nbeta), "gamma": float(res.gamma),
                      "damping": float(res.damping), "condition": cfg.condition,
                      "precondition_rank": cfg.precondition_rank,
                      "lambda_max": float(curv.lambda_max), "info": info}  # fmt: skip
    return out


def reference_rows(setting: Any, model: nn.Module, masks: Tensor, targets: Tensor) -> list[dict]:
    """grad-dot and EK-FAC through the benchmark's own runner; a skipped method (kronfluence
    missing) is cited from ``docs/bench/<setting>.json`` instead, marked ``cited``."""
    from bif.bench.runner import make_context, run_method

    doc = Path("docs/bench") / f"{setting.name}.json"
    bench = {r["method"]: r for r in json.loads(doc.read_text())["rows"]} if doc.is_file() else {}
    ctx, rows = make_context(setting, model), []
    for name in ("grad-dot", "ekfac"):
        r = run_method(name, ctx, masks, targets)
        row = {"method": name, "lds": r.lds, "ci_low": r.ci_low, "ci_high": r.ci_high,
               "seconds": r.seconds, "source": "computed"}  # fmt: skip
        if r.error and name in bench:
            b = bench[name]
            row.update({k: b[k] for k in ("lds", "ci_low", "ci_high", "seconds")},
                       source=f"cited from {doc} ({r.error[:60]})")  # fmt: skip
        rows.append(row)
    return rows


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_ceiling(
    setting_name: str = "shakespeare",
    steps: int = 24,
    twin: int = 2,
    n_boot: int = 1000,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """The whole table (see the module docstring) as JSON-able data. Products run in float32
    (their float64 twin on one vector is recorded), the Krylov algebra in float64."""
    from bif.baselines.influence import batched_cg
    from bif.baselines.lm_methods import sequence_gradients
    from bif.bench.runner import environment_meta
    from bif.bench.settings import load_setting
    from bif.eval.metrics import lds
    from bif.eval.retrain import load_ground_truth, train_reference
    from bif.lm.task import CausalLMTask

    setting = load_setting(setting_name)
    gt = load_ground_truth(setting_name)
    gt.check_setting(setting)
    model = train_reference(setting).eval()
    masks, targets = gt.masks, gt.mean_targets()
    refs = reference_rows(setting, model, masks, targets)
    auto = auto_rules(setting, model)
    log(f"references {refs}\nauto rules {auto}")
    n, x = setting.num_train, setting.x_train
    problems = {}
    for dt in (torch.float32, F64):
        fn, w, y = lm_logits(copy.deepcopy(model).to(dt), x)
        problems[dt] = (fn, w, lambda v, fn=fn, y=y: F.cross_entropy(fn(v), y, reduction="sum") / n)
    fn, w, loss_fn = problems[torch.float32]
    with torch.no_grad():
        lib = float(CausalLMTask().loss(model, x).double().mean())
    if abs(float(loss_fn(w)) - lib) > 1e-5 * abs(lib):
        raise RuntimeError(f"the logits path's loss {float(loss_fn(w))} is not the task's {lib}")
    gq = torch.stack(list(sequence_gradients(model, setting.x_query))).to(F64)  # [Q, P]
    gn = torch.stack(list(sequence_gradients(model, x))).to(F64)  # [N, P]
    meta = {"setting": setting_name, "num_params": int(w.numel()), "num_train": n,
            "num_query": int(gq.shape[0]), "num_subsets": gt.num_subsets,
            "num_seeds": gt.num_seeds, "krylov_steps": steps, "product_dtype": "float32",
            "mean_train_loss": lib, **environment_meta()}  # fmt: skip
    makers = {"H": lambda f, v, lf: hessian_op(lf, v), "GN": lambda f, v, lf: gn_op(f, v, 1 / n)}
    rows, curvatures = [], {}
    for curv, make in makers.items():
        op32 = make(*problems[torch.float32])
        op: Op = lambda v, op32=op32: op32(v.float()).to(F64)  # noqa: E731
        probe = torch.randn(w.numel(), generator=torch.Generator().manual_seed(0), dtype=F64)
        exact = make(*problems[F64])(probe)
        info: dict[str, Any] = {
            "f32_vs_f64_product": float((op(probe) - exact).norm() / exact.norm())
        }
        if curv == "H":  # the bottom of the spectrum, from 4 random vectors
            start = torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(1), dtype=F64)
            bottom = block_krylov(op, start, 40).ritz()
            info.update(random_ritz_min=float(bottom[0]), random_ritz_max=float(bottom[-1]))
        log(f"{curv}: block Krylov, {steps} blocks of {gq.shape[0]}; {info}")
        kry = block_krylov(op, gq, steps, log)
        ritz = kry.ritz()
        lam_max = float(ritz[-1])
        proj = kry.basis @ gn.T  # [m, N]
        shifts = [(f"λmax/{f}", lam_max / f) for f in FRACTIONS]
        shifts.append(("γ/nβ (auto)", auto["bench"]["damping"]))
        for label, lam in shifts:
            t0 = time.perf_counter()
            sc, res = krylov_scores(kry, lam, proj)
            r = lds(sc, masks, targets, n_boot=n_boot)
            below = int((ritz < -lam).sum())
            if curv == "H":  # each Ritz set interlaces: both counts are lower bounds
                below = max(below, int((bottom < -lam).sum()))
            rows.append({"curvature": curv, "damping": label, "lambda": lam,
                         "lds": r.mean, "ci_low": r.ci_low, "ci_high": r.ci_high,
                         "solve_seconds": time.perf_counter() - t0, "build_seconds": kry.seconds,
                         "residual_median": float(res.median()), "residual_max": float(res.max()),
                         "ritz_below_minus_lambda": below})  # fmt: skip
            log(f"  {rows[-1]}")
        # The twin: the library's CG on the first queries at the largest damping.
        lam = lam_max / FRACTIONS[0]
        apply: Op = lambda v, lam=lam, op=op: torch.stack([op(r) for r in v]) + lam * v  # noqa: E731
        xs, iters, rel = batched_cg(apply, gq[:twin], max_iter=200, tol=1e-6)
        cg, ks = -(xs @ gn.T), krylov_scores(kry, lam, proj)[0][:twin]
        info.update(lambda_max=lam_max, ritz_min=float(ritz[0]), build_seconds=kry.seconds,
                    hvps=kry.hvps, twin_cg={"queries": twin, "damping": lam, "iterations": iters,
                    "relative_residual": rel, "relative_score_difference":
                    float((cg - ks).abs().max() / cg.abs().max())})  # fmt: skip
        curvatures[curv] = info
        log(f"  {info}")
        del kry, op, op32, proj
    return {"meta": meta, "auto": auto, "curvatures": curvatures, "rows": rows, "references": refs}


def markdown(doc: dict[str, Any]) -> str:
    """The table: curvature, damping, LDS [95% interval], residuals, time."""
    lines = ["| curvature | damping λ | LDS [95% interval] | rel. residual (median / max) | "
             "Ritz < -λ | time (s): build + solve |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        lines.append(f"| {r['curvature']} | {r['damping']} = {r['lambda']:.3g} | {r['lds']:.3f} "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['residual_median']:.1e} / "
                     f"{r['residual_max']:.1e} | {r['ritz_below_minus_lambda']} | "
                     f"{r['build_seconds']:.0f} + {r['solve_seconds']:.1f} |")  # fmt: skip
    for r in doc["references"]:
        src = "" if r["source"] == "computed" else " (cited)"
        lines.append(f"| {r['method']}{src} | — | {r['lds']:.3f} [{r['ci_low']:.3f}, "
                     f"{r['ci_high']:.3f}] | — | — | {r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bif.bench.ceiling", description=__doc__)
    ap.add_argument("--setting", default="shakespeare")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=24, help="Krylov blocks of Q query gradients")
    ap.add_argument("--twin", type=int, default=2, help="queries re-solved by the library's CG")
    ap.add_argument("--out", default="docs/bench/ceiling.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    doc = run_ceiling(a.setting, a.steps, a.twin)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(markdown(doc))


if __name__ == "__main__":
    main()
