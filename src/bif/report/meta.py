"""Readable key/value tables for the report: the configuration and the run's ``meta``.

Values are shown the way a person reads them, not the way Python prints them: floats to 4
significant digits (``500.99999999999994`` is ``501``), lists summarised, nested dicts (the
preconditioner's record) as indented rows under a heading row instead of a ``{...}`` blob.
Stable hooks: ``table.config`` and ``table.meta`` with ``tr.group[data-key]`` heading rows and
``tr[data-key]`` value rows (dotted keys for nested entries, e.g. ``preconditioner.rank``).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

e = html.escape

# What each known ``result.meta`` entry means (others are shown without a meaning).
MEANINGS: dict[str, str] = {
    "observable": "what each query's φ is (the quantity the scores explain)",
    "task": "the per-sample training loss",
    "num_train": "training examples attributed (N)",
    "num_query": "queries explained (Q)",
    "num_params_sampled": "parameters the sampler moved (requires_grad=True)",
    "lambda_max": "largest Hessian eigenvalue of the training loss at w*",
    "damping": "γ / nβ: the damping of the equivalent damped influence function",
    "auto": "fields set by the automatic rules at the start of the run",
    "step_size_rule": "how the step size was chosen",
    "sampling_seconds": "wall time of the sampler (curvature included)",
    "resumed": "whether the run resumed from a checkpoint in run_dir",
    "identity": "hash pinning the run to its model, weights, data and task",
    "model_was_training": "the model came in training mode (sampled in eval mode)",
    "per_token": "per-token traces were recorded (causal-LM tasks)",
    "device": "where the chains ran",
    "preconditioner": "the curvature pass at w*: the mass matrix and the automatic rules",
    "preconditioner.mass": "which mass the kinetic sampler got, why, and what it cost",
    "preconditioner.mass.kind": "lowrank (Hessian eigenpairs), kronecker (per-layer K-FAC "
    "factors) or identity",
    "preconditioner.mass.bytes": "memory of the Kronecker mass",
    "preconditioner.mass.seconds": "time to build the Kronecker factors",
    "preconditioner.kmin_posterior": "smallest eigenvalue of (nβH + γI)/γ (the posterior "
    "exists if > 0)",
    "preconditioner.rank": "Hessian eigenpairs in the mass matrix",
    "preconditioner.hvps": "Hessian-vector products in the whole curvature pass",
    "preconditioner.eigenpair_hvps": "of which the eigensolver (0: read from run_dir)",
    "preconditioner.localised_directions": "negatively curved directions given extra localisation",
    "preconditioner.localised_mu": "the Hessian eigenvalues μ < 0 along those directions",
    "preconditioner.kmax_preconditioned": "largest eigenvalue k'max of M^-½(nβH + γI)M^-½ "
    "(sets the step size)",
    "preconditioner.kmin_preconditioned": "smallest eigenvalue k'min of the same matrix",
    "preconditioner.smallest_captured": "smallest captured curvature, in units of γ",
    "preconditioner.condition_unpreconditioned": "(nβ λmax + γ) / γ: the condition number "
    "without the mass matrix",
    "preconditioner.condition_lowered_to": "condition after lowering nβ for negative curvature",
    "preconditioner.seconds": "time spent on curvature",
}

Row = tuple[str, str, str, int]  # dotted key, value text, meaning, nesting depth


def fmt_number(v: float) -> str:
    """4 significant digits; plain digits with thousands separators from 10⁴ to 10⁹."""
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if 4 <= mag < 9:  # 50038.82 reads better as 50,040 than as 5.004e+04
        return f"{round(v, 3 - mag):,.0f}"
    return f"{v:.4g}"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def fmt_value(v: Any, key: str = "") -> str:
    """One value as text: numbers rounded, sequences summarised, mappings as ``k = v`` pairs."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = fmt_number(v)
        return f"{text} s" if key.endswith("seconds") and math.isfinite(v) else text
    if isinstance(v, Mapping):
        return "; ".join(f"{k} = {fmt_value(x, str(k))}" for k, x in v.items()) or "(empty)"
    if isinstance(v, Sequence) and not isinstance(v, str | bytes):
        return _fmt_sequence(list(v))
    return str(v)


def _fmt_sequence(items: list[Any]) -> str:
    if not items:
        return "(none)"
    if all(_is_number(x) for x in items) and len(items) > 4:
        xs = sorted(float(x) for x in items)
        mid = xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])
        return (
            f"{len(xs)} values: min {fmt_number(xs[0])}, median {fmt_number(mid)}, "
            f"max {fmt_number(xs[-1])}"
        )
    shown = [fmt_value(x) for x in items[:8]]
    more = f", … (+{len(items) - 8} more)" if len(items) > 8 else ""
    return ", ".join(shown) + more


def rows_of(
    mapping: Mapping[str, Any], meanings: Mapping[str, str] | None = None, prefix: str = ""
) -> list[Row]:
    """Table rows of ``mapping``; a nested mapping becomes a heading row and indented rows."""
    meanings = MEANINGS if meanings is None else meanings
    depth = prefix.count(".") + (1 if prefix else 0)
    out: list[Row] = []
    for k, v in mapping.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.append((key, "", meanings.get(key, ""), -1 - depth))  # heading: depth < 0
            out += rows_of(v, meanings, key)
        else:
            out.append((key, fmt_value(v, str(k)), meanings.get(key, ""), depth))
    return out


def config_rows(config: Any) -> list[Row]:
    """The configuration with each field's help text, and the derived damping γ/nβ."""
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config)}
    rows = rows_of(config.to_dict(), helps)
    rows.append(("damping", fmt_value(config.damping), "γ / nβ, as in a damped IF", 0))
    return rows


def table(cls: str, rows: list[Row], header: tuple[str, str, str]) -> str:
    """A three-column table (key, value, meaning); heading rows span the row."""
    body = []
    for key, value, meaning, depth in rows:
        name = key.rsplit(".", 1)[-1]
        if depth < 0:
            pad = -1 - depth
            note = f' <span class="muted">{e(meaning)}</span>' if meaning else ""
            body.append(
                f'<tr class="group" data-key="{e(key)}"><th colspan="3" class="depth-{pad}">'
                f"{e(name)}{note}</th></tr>"
            )
            continue
        body.append(
            f'<tr data-key="{e(key)}"><td class="key depth-{depth}">{e(name)}</td>'
            f'<td class="value">{e(value)}</td><td>{e(meaning)}</td></tr>'
        )
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    return (
        f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
        "</tbody></table>"
    )


def config_table(config: Any) -> str:
    return table("config", config_rows(config), ("field", "value", "meaning"))


def meta_table(meta: Mapping[str, Any]) -> str:
    return table("meta", rows_of(meta), ("key", "value", "meaning"))
