"""``bif run CONFIG.toml`` (:mod:`bif.runfile`): entry points, a local Hugging Face LM, resume,
the written outputs, ``python -m bif`` and one typed error per kind of mistake in the file.

Every run is tiny (a 4-2 linear classifier, or a 1-block Llama with hidden size 16; 2 chains of
10 + 20 steps, no pilot, unit mass) so the whole module stays within a few seconds of sampling.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from bif import BIFResult
from bif.cli import main
from bif.errors import ConfigError, DataError, RunConfigError
from bif.runfile import load_run_config, read_jsonl, run_config

FAST = textwrap.dedent(
    """
    [bif]
    num_chains = 2
    num_burnin = 10
    num_draws = 20
    pilot_steps = 0
    precondition_rank = 0
    trace_sample = 8
    """
)

MODEL_PY = textwrap.dedent(
    '''
    """A tiny seeded classifier (rebuilt identically on every call, so runs can resume)."""
    import torch
    from torch import nn
    import torch.nn.functional as F


    def build():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(24, 4, generator=g)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
        model = nn.Linear(4, 2)
        with torch.no_grad():
            model.weight.copy_(0.1 * torch.randn(2, 4, generator=g))
            model.bias.zero_()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return {"model": model.eval(), "train": (x, y), "query": (x[:3], y[:3])}


    def returns_list():
        return [1, 2, 3]


    def returns_partial():
        return {"model": nn.Linear(4, 2), "train": None}


    def returns_no_module():
        return {"model": "weights.pt", "train": None, "query": None}

    NOT_A_FUNCTION = 3
    '''
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with the entry's model.py."""
    (tmp_path / "model.py").write_text(MODEL_PY)
    return tmp_path


def write(folder: Path, text: str, name: str = "bif.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_entry_file_run_writes_outputs_and_resumes(project: Path, capsys) -> None:
    cfg = write(project, 'entry = "model.py:build"\nout = "out"\nobservable = "margin"\n' + FAST)
    assert main(["run", str(cfg), "--quiet", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    out = project / "out"
    assert "report:" in printed and str(out / "result") in printed
    result = BIFResult.load(out / "result")
    assert result.scores.shape == (3, 24) and bool(result.scores.isfinite().all())
    assert result.meta["resumed"] is False and result.config.seed == 3  # the flag won
    assert (out / "report.html").stat().st_size > 1000 and (out / "run").is_dir()
    # The copy: absolute paths, every field resolved, and itself a valid run configuration.
    copy = tomllib.loads((out / "config.toml").read_text())
    assert copy["entry"] == f"{project / 'model.py'}:build" and copy["observable"] == "margin"
    assert copy["bif"]["seed"] == 3 and isinstance(copy["bif"]["step_size"], float)
    assert load_run_config(out / "config.toml").config == result.config

    assert main(["run", str(cfg), "--quiet", "--seed", "3"]) == 0  # the same command again
    assert "resumed from" in capsys.readouterr().out
    again = BIFResult.load(out / "result")
    assert again.meta["resumed"] is True
    torch.testing.assert_close(again.scores, result.scores)
    # Another config into the same out: refused, saying how to start afresh.
    assert main(["run", str(cfg), "--quiet", "--seed", "4"]) == 2
    assert "give another out (or --out)" in capsys.readouterr().err


def test_module_entry_and_out_flag(project: Path, tmp_path: Path) -> None:
    # A package next to the configuration: its folder is searched first.
    pkg = project / "bif_run_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODEL_PY)
    cfg = write(project, 'entry = "bif_run_test_pkg.models:build"\ntask = "classification"\n'
                + FAST)  # fmt: skip
    try:
        out = run_config(cfg, {"num_draws": 30}, out=tmp_path / "elsewhere", progress=False)
    finally:
        for name in [m for m in sys.modules if m.startswith("bif_run_test_pkg")]:
            del sys.modules[name]
    assert out.is_main and out.result_dir == tmp_path / "elsewhere" / "result"
    assert BIFResult.load(out.result_dir).scores.shape == (3, 24)
    assert out.result.config.num_draws == 30 and out.report_path.exists()


def tiny_lm_dir(folder: Path) -> Path:
    """A random 1-block Llama (hidden 16) and a byte-level BPE tokenizer trained on a few
    sentences, saved with save_pretrained: all offline."""
    transformers = pytest.importorskip("transformers")
    from bif.bench.lm import shakespeare as sh

    texts = ["The capital of France is Paris.", "Seven is written as 7.", "Q: two?\nA: 2"]
    tok = sh.build_tokenizer([sh.Speech("p", "1", "1", "A", t) for t in texts], vocab_size=300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    path = folder / "tiny-lm"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_model_with_both_jsonl_forms(tmp_path: Path) -> None:
    tiny_lm_dir(tmp_path)
    lines = [{"text": "The capital of France is Paris."}, {"text": "Seven is written as 7."},
             {"text": "Paris is in France."}]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    queries = [{"prompt": "Q: two?\nA:", "completion": " 2"},
               {"prompt": "The capital of France is", "completion": " Paris."}]  # fmt: skip
    (tmp_path / "query.jsonl").write_text("\n".join(map(json.dumps, queries)))
    cfg = write(tmp_path, 'hf_model = "tiny-lm"\ntrain = "train.jsonl"\nquery = "query.jsonl"\n'
                'out = "lm-out"\nmax_length = 32\n' + FAST)  # fmt: skip
    out = run_config(cfg, progress=False)
    result = BIFResult.load(out.result_dir)
    assert result.scores.shape == (2, 3) and result.tokens is not None
    # Only the completion is attributed: every query token lies after its prompt's tokens.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny-lm", local_files_only=True)
    for q, row in enumerate(queries):
        prompt_len = len(tok(row["prompt"])["input_ids"]) - 1  # <bos> + prompt, no <eos>
        assert int(result.tokens.positions("query", q).min()) >= prompt_len
    assert (out.result_dir / "lm.json").exists() and "token" in out.report_path.read_text()
    copy = tomllib.loads(out.config_path.read_text())
    assert copy["hf_model"] == str(tmp_path / "tiny-lm") and copy["max_length"] == 32


def test_read_jsonl_forms(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ab"}\n{"prompt": "x", "completion": "y"}\n')
    assert read_jsonl(path) == (["ab", "xy"], ["", "x"])
    path.write_text('{"text": "ab"}\n\n{"text": "cd"}\n')
    assert read_jsonl(path) == (["ab", "cd"], None)


def test_python_dash_m_bif(project: Path) -> None:
    cfg = write(project, 'entry = "model.py:build"\nout = "out"\n' + FAST)
    proc = subprocess.run(
        [sys.executable, "-m", "bif", "run", str(cfg), "--quiet"], capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert BIFResult.load(project / "out" / "result").scores.shape == (3, 24)


ENTRY = 'entry = "model.py:build"\nout = "out"\n'
HF = 'hf_model = "lm"\ntrain = "train.jsonl"\nquery = "query.jsonl"\nout = "out"\n'
BAD = [
    ('entri = "model.py:build"\nout = "o"', RunConfigError, "Did you mean 'entry'?"),
    (ENTRY + "num_chains = 2", RunConfigError, "put it in the [bif] table"),
    (ENTRY + 'hf_model = "lm"', RunConfigError, "has both of 'entry' and 'hf_model'"),
    ('out = "o"', RunConfigError, "has neither of 'entry' and 'hf_model'"),
    ('entry = "model.py:build"', RunConfigError, "no output directory"),
    ('entry = "nope.py:build"\nout = "o"', RunConfigError, "no such file"),
    ('entry = "model.py"\nout = "o"', RunConfigError, 'must be "FILE.py:FUNCTION"'),
    ('entry = "model.py:biuld"\nout = "o"', RunConfigError, "no function 'biuld'. Did you mean"),
    ('entry = "model.py:NOT_A_FUNCTION"\nout = "o"', RunConfigError, "is a int, not a function"),
    ('entry = "no_such_module_xyz:build"\nout = "o"', RunConfigError, "no module named"),
    ('entry = "model.py:returns_list"\nout = "o"', RunConfigError, "it returned list [1, 2, 3]"),
    ('entry = "model.py:returns_partial"\nout = "o"', RunConfigError, "lacks 'query'"),
    ('entry = "model.py:returns_no_module"\nout = "o"', RunConfigError, "not a torch.nn.Module"),
    (ENTRY + 'train = "train.jsonl"', RunConfigError, "applies to hf_model runs only"),
    (ENTRY + "out = 3", RunConfigError, "not valid TOML"),  # a duplicate key
    ('entry = "model.py:build"\nout = 3', RunConfigError, "out must be a string"),
    (ENTRY + "[bif]\nnum_chain = 2", ConfigError, "unknown field 'num_chain' in [bif]. Did you"),
    (ENTRY + "[bif]\nnum_chains = 0", ConfigError, "num_chains must be >= 1"),
    (ENTRY + '[bif]\nstep_size = "fast"', ConfigError, "expected one of {FLOAT,auto}"),
    (HF + 'task = "regression"', RunConfigError, "applies to entry runs only"),
    (HF.replace('query = "query.jsonl"\n', ""), RunConfigError, "needs query ="),
    (HF.replace('"lm"', '"missing-lm"'), RunConfigError, "no such directory"),
    (HF, DataError, "train.jsonl, line 2: not valid JSON"),
    (HF.replace("train.jsonl", "query.jsonl", 1), DataError, "query.jsonl, line 1: a line must"),
    (HF.replace("train.", "good.").replace("query.", "good."), RunConfigError, "not a loadable"),
]


@pytest.mark.parametrize(("text", "error", "fragment"), BAD, ids=[b[2][:30] for b in BAD])
def test_bad_config_raises_typed_error(project: Path, text: str, error: type, fragment: str):
    (project / "lm").mkdir()
    (project / "train.jsonl").write_text('{"text": "ok"}\n{"text": "ok",}\n')
    (project / "query.jsonl").write_text('{"txt": "a"}\n')
    (project / "good.jsonl").write_text('{"text": "ok"}\n')
    cfg = write(project, text)
    with pytest.raises(error) as info:
        run_config(cfg, progress=False)
    assert fragment in str(info.value)
    assert not (project / "out" / "result").exists()


def test_cli_error_is_one_line_exit_2(project: Path, capsys) -> None:
    cfg = write(project, 'entry = "model.py:build"\nouts = "o"\n')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Did you mean 'out'?" in err and "\n" not in err
    assert main(["run", str(project / "missing.toml")]) == 2
    assert "no configuration file" in capsys.readouterr().err
