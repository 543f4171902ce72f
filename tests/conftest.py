"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny tensors: one thread is fastest, and OpenMP barriers spin badly on 2 shared
    cores (a run measured 1.7 s with two threads against 0.03 s with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- `bif demo`, run once per session (used by test_demo.py, test_cli.py, test_report.py) ---


@dataclass(frozen=True)
class DemoRun:
    out_dir: Path  # what `bif demo --out` was given
    proc: subprocess.CompletedProcess  # exit status, stdout, stderr of the real command

    @property
    def result_dir(self) -> Path:
        return self.out_dir / "result"

    @property
    def report(self) -> Path:
        return self.out_dir / "report.html"


@pytest.fixture(scope="session")
def bif_cmd() -> list[str]:
    """This interpreter's ``bif`` console script (``python -m bif.cli`` if it is absent)."""
    script = Path(sys.executable).with_name("bif")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bif.cli"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory, bif_cmd: list[str]) -> DemoRun:
    """The real default ``bif demo --out DIR``, run exactly once, in a temporary directory."""
    cwd = tmp_path_factory.mktemp("demo")
    out = cwd / "bif-demo"
    # The command runs in a temporary directory: a relative PYTHONPATH (`PYTHONPATH=src`, as in
    # a worktree) would resolve there and silently fall back to the installed bif.
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        parts = env["PYTHONPATH"].split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(str(Path(x).resolve()) for x in parts if x)
    proc = subprocess.run(
        [*bif_cmd, "demo", "--out", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return DemoRun(out, proc)
