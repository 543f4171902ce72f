"""HTML reports built only from saved artefacts (a :class:`bif.BIFResult`) and example views.

from bif.report import ExampleView, write_report
write_report("report.html", BIFResult.load("run/result"),
             train_views=[ExampleView("label 3", image=img) for img in ...])
"""

from bif.report.html import render_report, train_example, write_report
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
