"""The chain diagnostics on a page: the verdict banner, the R-hat/ESS tables and the badge of a
query whose scores are not resolved, from a saved :class:`bif.diagnostics.Diagnostics` only.

Stable hooks (example pages and token pages alike):

- ``div.verdict[data-verdict]`` at the top of the page (``ok``, ``warn``, ``fail``, or ``none``
  for a result saved without diagnostics), its findings ``li.reason[data-level][data-check]``
  each with a ``.fix``
- ``table.diagnostics-table[data-table="groups"]``: one ``tr[data-group]`` per trace group
  (``draw_loss``, ``query``, ``train_sample``, ``tokens``)
- ``table.diagnostics-table[data-table="queries"]``: ``tr[data-query][data-unresolved]`` with
  R-hat, bulk ESS and the relative Monte-Carlo error of the query's top-k scores
- ``span.badge.unresolved[title]`` where an unresolved query's scores are shown, and
  ``data-unresolved="true"`` on its ``article``
- cells beyond a threshold carry ``flag-warn`` or ``flag-fail``
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

e = html.escape

# Used when a saved result's thresholds lack an entry (the values of bif.diagnostics).
_DEFAULTS = {
    "rhat_warn": 1.01, "rhat_warn_max": 1.05, "rhat_fail": 1.1, "ess_warn_per_chain": 25,
    "ess_fail": 20, "max_relative_mcse": 0.1, "top_k": 5,
}  # fmt: skip
MAX_QUERY_ROWS = 100  # beyond this many queries the per-query table lists the worst ones
HEADLINE = {
    "ok": "the chains agree and mix: the scores' standard errors can be trusted",
    "warn": "read the findings below before trusting the scores",
    "fail": "the chains are broken: the scores are not reliable",
}


def _nan(x: Any) -> Any:
    """JSON wrote NaN as null: back to NaN (recursively), so that numbers format again."""
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return x


def restore_nan(diag: Any) -> Any:
    """A copy of ``diag`` whose numbers saved as JSON ``null`` are NaN again (``str(diag)`` and
    the tables format them; a reloaded result has ``None`` where a group had no trace)."""
    if diag is None:
        return None
    return dataclasses.replace(
        diag,
        summary=_nan(diag.summary),
        query=_nan(diag.query),
        drift=_nan(diag.drift),
        energy=_nan(diag.energy),
    )


def threshold(diag: Any, key: str) -> float:
    value = (diag.thresholds or {}).get(key)
    return float(_DEFAULTS[key] if value is None else value)


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _num(x: Any, fmt: str) -> str:
    v = _f(x)
    return format(v, fmt) if math.isfinite(v) else "n/a"


def relative_mcse_of(diag: Any, q: int) -> float:
    rel = (diag.query or {}).get("relative_mcse") or []
    return _f(rel[q]) if q < len(rel) else math.nan


def unresolved_title(diag: Any, q: int) -> str:
    """Why query ``q`` is marked: its top-k error against the threshold."""
    k = int(threshold(diag, "top_k"))
    limit = 100 * threshold(diag, "max_relative_mcse")
    rel = relative_mcse_of(diag, q)
    size = f"{100 * rel:.0f}% of their size" if math.isfinite(rel) else "unknown"
    return (
        f"unresolved: the Monte-Carlo error of this query's top-{k} scores is {size}, above "
        f"{limit:.0f}%; their order may change with more draws (num_draws, or num_draws='auto')"
    )


def is_unresolved(diag: Any, q: int) -> bool:
    return diag is not None and q in set(diag.unresolved or [])


def unresolved_badge(diag: Any, q: int) -> str:
    """``<span class="badge unresolved" title=...>`` for an unresolved query, else ``""``."""
    if not is_unresolved(diag, q):
        return ""
    title = e(unresolved_title(diag, q))
    return f'<span class="badge unresolved" title="{title}">unresolved</span>'


def _unresolved_line(diag: Any, num_queries: int) -> str:
    n = len(diag.unresolved or [])
    if not n:
        return ""
    k = int(threshold(diag, "top_k"))
    limit = 100 * threshold(diag, "max_relative_mcse")
    return (
        f'<p class="unresolved-count">{n} of {num_queries} queries have top-{k} scores with a '
        f"Monte-Carlo error above {limit:.0f}% of their size: they are marked "
        '<span class="badge unresolved">unresolved</span> where their scores are shown.</p>'
    )


def verdict_banner(diag: Any, num_queries: int) -> str:
    """The banner at the top of a page (``div.verdict[data-verdict]``): short and green for ok,
    every finding and its fix otherwise, neutral for a result saved without diagnostics."""
    if diag is None:
        return (
            '<div class="verdict verdict-none" data-verdict="none" role="status">'
            "<p><b>No chain diagnostics recorded</b> with this result (it was saved by an older "
            "bif). <code>bif diagnose RESULT_DIR</code> computes them from its saved traces."
            "</p></div>"
        )
    v = str(diag.verdict)
    head = HEADLINE.get(v, "")
    reasons = "".join(
        f'<li class="reason reason-{e(r.level)}" data-level="{e(r.level)}" '
        f'data-check="{e(r.check)}"><span class="level">{e(r.level)}</span> '
        f"<b>{e(r.check)}</b>: {e(r.message)}"
        f'<div class="fix"><b>Fix:</b> {e(r.fix)}</div></li>'
        for r in diag.reasons
    )
    reasons = f'<ul class="reasons">{reasons}</ul>' if reasons else ""
    return (
        f'<div class="verdict verdict-{e(v)}" data-verdict="{e(v)}" role="status">'
        f'<p class="verdict-head"><b>Diagnostics: {e(v)}</b> — {e(head)} '
        '<a href="#chain-diagnostics">(details)</a></p>'
        f"{reasons}{_unresolved_line(diag, num_queries)}</div>"
    )


def _cell(value: Any, fmt: str, level: str = "") -> str:
    cls = "value" + (f" flag-{level}" if level else "")
    return f'<td class="{cls}">{e(_num(value, fmt))}</td>'


def _rhat_level(r: float, warn: float, fail: float) -> str:
    return "fail" if r > fail else "warn" if r > warn else ""


def _ess_level(x: float, warn: float, fail: float) -> str:
    return "fail" if x < fail else "warn" if x < warn else ""


GROUP_NAMES = {
    "draw_loss": "draw loss (mean training loss)",
    "query": "query observables",
    "train_sample": "sampled training losses",
    "tokens": "sampled token losses",
}


def groups_table(diag: Any, num_chains: int) -> str:
    """One row per trace group: max and median R-hat, min and median bulk ESS, min tail ESS."""
    fail, ess_fail = threshold(diag, "rhat_fail"), threshold(diag, "ess_fail")
    warn, warn_max = threshold(diag, "rhat_warn"), threshold(diag, "rhat_warn_max")
    ess_warn = threshold(diag, "ess_warn_per_chain") * num_chains
    rows = []
    summary = diag.summary or {}
    known = [n for n in GROUP_NAMES if n in summary]  # a saved result's keys come back sorted
    for name in known + [n for n in summary if n not in GROUP_NAMES]:
        row = summary[name] or {}
        r_max, r_med = _f(row.get("rhat_max")), _f(row.get("rhat_median"))
        eb = _f(row.get("ess_bulk_min"))
        one = name == "draw_loss"  # a single trace: the strict level applies to its R-hat
        traces = row.get("traces")
        rows.append(
            f'<tr data-group="{e(name)}"><th>{e(GROUP_NAMES.get(name, name))}</th>'
            f'<td class="value">{e(str(traces)) if traces is not None else "–"}</td>'
            f"{_cell(r_max, '.3f', _rhat_level(r_max, warn if one else warn_max, fail))}"
            f"{_cell(r_med, '.3f', _rhat_level(r_med, warn, fail))}"
            f"{_cell(eb, '.0f', _ess_level(eb, ess_warn if one else -1.0, ess_fail))}"
            f"{_cell(row.get('ess_bulk_median'), '.0f')}"
            f"{_cell(row.get('ess_tail_min'), '.0f')}</tr>"
        )
    return (
        '<table class="diagnostics-table" data-table="groups"><thead><tr><th>traces</th>'
        "<th>count</th><th>max R-hat</th><th>median R-hat</th><th>min bulk ESS</th>"
        f"<th>median bulk ESS</th><th>min tail ESS</th></tr></thead><tbody>{''.join(rows)}"
        "</tbody></table>"
    )


def _query_order(diag: Any, num_queries: int) -> list[int]:
    """Every query in order, or (more than :data:`MAX_QUERY_ROWS`) the unresolved and the
    highest R-hat ones first."""
    if num_queries <= MAX_QUERY_ROWS:
        return list(range(num_queries))
    rh = (diag.query or {}).get("rhat") or []
    bad = set(diag.unresolved or [])

    def key(q: int) -> tuple[bool, float, float]:
        r = _f(rh[q]) if q < len(rh) else math.nan
        rel = relative_mcse_of(diag, q)
        fin = lambda x: x if math.isfinite(x) else 0.0  # noqa: E731
        return (q not in bad, -fin(r), -fin(rel))

    return sorted(sorted(range(num_queries), key=key)[:MAX_QUERY_ROWS])


def queries_table(diag: Any, num_queries: int) -> str:
    """Per query: R-hat and bulk ESS of its trace, relative error of its top-k scores."""
    per = diag.query or {}
    rh, eb = per.get("rhat") or [], per.get("ess_bulk") or []
    warn, fail = threshold(diag, "rhat_warn_max"), threshold(diag, "rhat_fail")
    ess_fail, limit = threshold(diag, "ess_fail"), threshold(diag, "max_relative_mcse")
    k = int(threshold(diag, "top_k"))
    rows = []
    shown = _query_order(diag, num_queries)
    for q in shown:
        r = _f(rh[q]) if q < len(rh) else math.nan
        b = _f(eb[q]) if q < len(eb) else math.nan
        rel = relative_mcse_of(diag, q)
        bad = is_unresolved(diag, q)
        status = unresolved_badge(diag, q) if bad else '<span class="resolved">resolved</span>'
        cls = ' class="unresolved"' if bad else ""
        rows.append(
            f'<tr data-query="{q}" data-unresolved="{str(bad).lower()}"{cls}>'
            f'<th><a href="#query-{q}">query {q}</a></th>'
            f"{_cell(r, '.3f', _rhat_level(r, warn, fail))}"
            f"{_cell(b, '.0f', _ess_level(b, -1.0, ess_fail))}"
            f"{_cell(100 * rel, '.1f', 'warn' if bad else '')}<td>{status}</td></tr>"
        )
    note = (
        f'<p class="muted">Showing the {len(shown)} of {num_queries} queries that are '
        "unresolved or have the largest R-hat.</p>"
        if len(shown) < num_queries
        else ""
    )
    return (
        f"{note}"
        '<table class="diagnostics-table" data-table="queries"><thead><tr><th>query</th>'
        f"<th>R-hat</th><th>bulk ESS</th><th>top-{k} error (% of |score|)</th>"
        f"<th>status (limit {100 * limit:.0f}%)</th></tr></thead><tbody>{''.join(rows)}"
        "</tbody></table>"
    )


def drift_energy_text(diag: Any) -> str:
    """Drift (Geweke z, trend R²) and energy (relative to P/2) in one short paragraph."""
    d = diag.drift or {}
    parts = [
        f"Drift of the draw loss: Geweke z = {_num(d.get('z'), '+.2f')}, the linear trend "
        f"explains {_num(100 * _f(d.get('r2_mean')), '.1f')}% of each chain's variance on "
        "average."
    ]
    en = diag.energy or {}
    if math.isfinite(_f(en.get("mean"))):
        parts.append(
            f"Energy U(w) − U(w*) of the second half of the draws: {_num(en.get('mean'), '.3g')} "
            "× P/2 on average (≈ 1 for a locally quadratic posterior; informative)."
        )
    return f'<p class="drift-energy">{" ".join(e(p) for p in parts)}</p>'


def diagnostics_tables(diag: Any, num_chains: int, num_queries: int) -> str:
    """The R-hat/ESS tables with a line on how to read them."""
    warn, warn_max = threshold(diag, "rhat_warn"), threshold(diag, "rhat_warn_max")
    fail = threshold(diag, "rhat_fail")
    return (
        '<p class="muted">R-hat compares the chains (rank-normalised split R-hat; 1 when they '
        f"agree; warn above {warn:g} for the draw loss and the medians, above {warn_max:g} for "
        f"the maximum over many traces; fail above {fail:g}). ESS is the effective number of "
        "independent draws (bulk: the centre of the distribution, tail: its 5% and 95% "
        "quantiles). Shaded cells are beyond a threshold.</p>"
        f"{groups_table(diag, num_chains)}{drift_energy_text(diag)}"
        f"<h4>Per query</h4>{queries_table(diag, num_queries)}"
    )
