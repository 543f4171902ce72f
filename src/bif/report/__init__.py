"""HTML reports built only from saved artefacts (a :class:`bif.BIFResult`) and example views.

from bif.report import ExampleView, write_report
write_report("report.html", BIFResult.load("run/result"),
             train_views=[ExampleView("label 3", image=img) for img in ...])

Without views every training example is still a card with its score ± stderr, its loss at w*
and whether the score is distinguishable from zero. Per-token results (causal LMs) get token
heatmaps instead: :mod:`bif.report.tokens`, built from a saved result by
:func:`bif.report.lm.write_lm_report`.
"""

from bif.report.cards import train_example
from bif.report.html import render_report, write_report
from bif.report.plots import loss_trace_plots
from bif.report.views import ExampleView, ViewSource, get_view, png_data_uri

__all__ = [
    "ExampleView",
    "ViewSource",
    "get_view",
    "loss_trace_plots",
    "png_data_uri",
    "render_report",
    "train_example",
    "write_report",
]
