"""``bif run CONFIG.toml``: attribute your own model from a configuration file.

A run configuration names the model and data one of two ways::

    # an entry point: a function (no arguments) returning a dict with "model", "train", "query"
    # and optionally "task" and "observable" (anything bif.attribute accepts for them)
    entry = "model.py:build"            # a file, relative to this TOML file's directory ...
    # entry = "mypkg.models:build"      # ... or an importable module
    task = "classification"             # optional: overrides the entry's "task"
    observable = "margin"               # optional: overrides the entry's "observable"
    out = "bif-out"                     # output directory, relative to this file

    # or a local Hugging Face causal LM, with JSONL data
    hf_model = "checkpoints/my-lm"      # a save_pretrained directory (read offline)
    train = "train.jsonl"               # {"text": ...} or {"prompt": ..., "completion": ...} lines
    query = "query.jsonl"
    max_length = 256                    # optional: truncate sequences to this many tokens

    trainable = ["model.layers.1.*"]    # optional: only these parameters are sampled
    device = "cuda"                     # optional: where to sample

    [bif]                               # optional: any BIFConfig field
    num_chains = 4
    batch_size = "full"                 # "none"/"full" for None, as on the command line

:func:`run_config` writes ``OUT/run`` (the checkpoints: running the same configuration again
resumes there, or returns the finished run), ``OUT/result`` (:meth:`bif.BIFResult.save`),
``OUT/report.html`` and ``OUT/config.toml``: the configuration as run, with absolute paths and
every ``[bif]`` field resolved (automatic values replaced by the ones chosen), itself a valid run
configuration. Every mistake in the file raises :class:`bif.errors.RunConfigError` (a
:class:`bif.errors.ConfigError`) naming the key and the fix; a bad JSONL line raises
:class:`bif.errors.DataError` with its line number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bif._version import __version__
from bif.config import BIFConfig
from bif.errors import ArtifactError, ConfigError, DataError, RunConfigError
from bif.flags import value_parser
from bif.result import BIFResult

__all__ = ["RunOutput", "RunSpec", "build_inputs", "load_run_config", "run_config"]

# Top-level keys and the TOML types they take (what `bif run` documents).
KEYS: dict[str, type | tuple[type, ...]] = {
    "entry": str,
    "hf_model": str,
    "train": str,
    "query": str,
    "out": str,
    "task": str,
    "observable": str,
    "max_length": int,
    "trainable": list,
    "device": str,
    "bif": dict,
}
RETURN_KEYS = ("model", "train", "query", "task", "observable")
RESULT_DIR, RUN_DIR, REPORT_FILE, CONFIG_COPY = "result", "run", "report.html", "config.toml"
_IDENT = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class RunSpec:
    """A validated run configuration (paths absolute; ``config`` merged with overrides)."""

    path: Path  # the TOML file
    out: Path
    config: BIFConfig
    entry: str | None = None
    hf_model: Path | None = None
    train: Path | None = None
    query: Path | None = None
    task: str | None = None
    observable: str | None = None
    max_length: int | None = None
    trainable: tuple[str, ...] | None = None
    device: str | None = None

    @property
    def base(self) -> Path:
        """The TOML file's directory: relative paths in it start here."""
        return self.path.parent


@dataclass
class RunInputs:
    """What :func:`bif.attribute` is called with (plus the tokenizer of an ``hf_model`` run)."""

    model: nn.Module
    train: Any
    query: Any
    task: Any = "classification"
    observable: Any = None
    tokenizer: Any = None


@dataclass
class RunOutput:
    """What :func:`run_config` did. The paths are None on the ranks > 0 of a distributed run,
    which write nothing."""

    spec: RunSpec
    result: BIFResult
    out_dir: Path
    result_dir: Path | None
    report_path: Path | None
    config_path: Path | None
    is_main: bool
    seconds: float


# --- reading and validating the file -------------------------------------------------------


def _closest(word: str, choices: typing.Iterable[str]) -> str:
    """`` did you mean 'x'?`` for the closest choice, or ``""``."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""


def _bif_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(BIFConfig)]


def _check_keys(raw: Mapping[str, Any], path: Path) -> None:
    """Unknown keys (with the closest known one) and wrongly typed values."""
    for key, value in raw.items():
        if key not in KEYS:
            if key in _bif_fields():
                raise RunConfigError(
                    f"{path}: {key!r} is a BIF hyperparameter; put it in the [bif] table "
                    f"(a line '[bif]' above '{key} = ...')."
                )
            raise RunConfigError(
                f"{path}: unknown key {key!r}.{_closest(key, KEYS)} Known keys: {', '.join(KEYS)}."
            )
        want = KEYS[key]
        if isinstance(value, bool) or not isinstance(value, want):
            kind = {str: "a string", int: "an integer", list: "a list", dict: "a table"}[want]
            raise RunConfigError(
                f"{path}: {key} must be {kind}, got {value!r} ({type(value).__name__})."
            )


def _resolve(base: Path, text: str) -> Path:
    """A path from the file: ``~`` expanded, relative to the file's directory."""
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def _existing(base: Path, key: str, text: str, path: Path, kind: str = "file") -> Path:
    p = _resolve(base, text)
    ok = p.is_dir() if kind == "directory" else p.is_file()
    if not ok:
        raise RunConfigError(
            f"{path}: {key} = {text!r}: no such {kind} ({p}); paths are relative to the "
            "configuration file's directory."
        )
    return p.resolve()


def _bif_table(table: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The ``[bif]`` values as BIFConfig fields: strings are read like the CLI flags ("auto",
    "none"/"full" for None, numbers), since TOML has no None."""
    hints = typing.get_type_hints(BIFConfig)
    out: dict[str, Any] = {}
    for name, value in table.items():
        if name not in hints:
            raise RunConfigError(
                f"{path}: unknown field {name!r} in [bif].{_closest(name, hints)} Known fields: "
                f"{', '.join(_bif_fields())}."
            )
        if isinstance(value, str) and hints[name] is not bool:
            try:
                value = value_parser(name, hints[name])[0](value)
            except argparse.ArgumentTypeError as err:
                raise RunConfigError(f"{path}: [bif] {name} = {value!r}: {err}.") from err
        out[name] = value
    return out


def load_run_config(
    path: str | Path, overrides: Mapping[str, Any] | None = None, out: str | Path | None = None
) -> RunSpec:
    """Read and check a run configuration; nothing is imported, loaded or run yet.

    Args:
        path: the TOML file.
        overrides: :class:`BIFConfig` fields that override its ``[bif]`` table (the CLI flags).
        out: output directory overriding the file's ``out`` (relative to the working directory).

    Raises:
        RunConfigError: the file is missing or not TOML, a key is unknown, missing, of the
            wrong type or conflicts with another, a named file does not exist, or a ``[bif]``
            field is unknown or invalid.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RunConfigError(f"no configuration file {path}; give the path of a .toml file.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RunConfigError(f"{path} is not valid TOML: {err}.") from err
    _check_keys(raw, path)
    base = path.parent
    has_entry, has_hf = "entry" in raw, "hf_model" in raw
    if has_entry == has_hf:
        which = "both" if has_entry else "neither"
        raise RunConfigError(
            f"{path} has {which} of 'entry' and 'hf_model'; give exactly one: entry = "
            '"model.py:build" (a function returning model, train and query) or hf_model = '
            '"DIR" (a Hugging Face causal LM) with train and query JSONL files.'
        )
    if has_entry:
        for key in ("train", "query", "max_length"):
            if key in raw:
                raise RunConfigError(
                    f"{path}: {key!r} applies to hf_model runs only; an entry function returns "
                    "its own model, train and query. Remove it."
                )
    else:
        for key in ("task", "observable"):
            if key in raw:
                raise RunConfigError(
                    f"{path}: {key!r} applies to entry runs only; an hf_model run attributes "
                    "each sequence's next-token loss (bif.lm.CausalLMTask). Remove it."
                )
        for key in ("train", "query"):
            if key not in raw:
                raise RunConfigError(
                    f'{path}: an hf_model run needs {key} = "{key}.jsonl": a JSONL file of '
                    '{"text": ...} or {"prompt": ..., "completion": ...} lines.'
                )
    if out is not None:
        out_dir = Path(out).expanduser().resolve()
    elif "out" in raw:
        out_dir = _resolve(base, raw["out"]).resolve()
    else:
        raise RunConfigError(
            f'{path}: no output directory; add out = "bif-out" (relative to the file) or pass '
            "--out DIR."
        )
    try:
        config = BIFConfig.from_dict(_bif_table(raw.get("bif", {}), path))
        config = config.replace(**(overrides or {}))
    except RunConfigError:
        raise
    except ConfigError as err:
        raise RunConfigError(f"{path}: [bif]: {err}") from err
    max_length = raw.get("max_length")
    if max_length is not None and max_length < 2:
        raise RunConfigError(
            f"{path}: max_length must be >= 2 (the first token is context only), got {max_length}."
        )
    trainable = raw.get("trainable")
    if trainable is not None and (not trainable or not all(isinstance(p, str) for p in trainable)):
        raise RunConfigError(
            f"{path}: trainable must be a non-empty list of parameter-name patterns, e.g. "
            f'["model.layers.1.*"], got {trainable!r}.'
        )
    return RunSpec(
        path=path,
        out=out_dir,
        config=config,
        entry=_check_entry(raw["entry"], base, path) if has_entry else None,
        hf_model=_existing(base, "hf_model", raw["hf_model"], path, "directory")
        if has_hf
        else None,
        train=_existing(base, "train", raw["train"], path) if "train" in raw else None,
        query=_existing(base, "query", raw["query"], path) if "query" in raw else None,
        task=raw.get("task"),
        observable=raw.get("observable"),
        max_length=max_length,
        trainable=tuple(trainable) if trainable is not None else None,
        device=raw.get("device"),
    )


def _split_entry(entry: str) -> tuple[str, str, bool]:
    """``(target, function, is_file)`` of ``"FILE.py:FUNCTION"`` or ``"pkg.mod:FUNCTION"``, or
    ``("", "", False)`` when it has neither form. The last colon splits, so a Windows drive
    letter stays in the path."""
    target, sep, func = entry.rpartition(":")
    if not sep or not target or not _IDENT.fullmatch(func):
        return "", "", False
    if target.endswith(".py"):
        return target, func, True
    if all(_IDENT.fullmatch(part) for part in target.split(".")):
        return target, func, False
    return "", "", False


def _check_entry(entry: str, base: Path, path: Path) -> str:
    """The entry with an absolute file path (a module entry is returned as it is)."""
    target, func, is_file = _split_entry(entry)
    if not target:
        raise RunConfigError(
            f'{path}: entry = {entry!r} must be "FILE.py:FUNCTION" (a file relative to the '
            'configuration) or "package.module:FUNCTION" (an importable module).'
        )
    if is_file:
        return f"{_existing(base, 'entry', target, path)}:{func}"
    return entry


# --- building the model and data -----------------------------------------------------------


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` meanwhile: the entry's module can import its siblings."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_entry(spec: RunSpec) -> Any:
    """The entry's module (imported, or executed from its file)."""
    assert spec.entry is not None
    target, _, is_file = _split_entry(spec.entry)
    if is_file:
        file = Path(target)
        # A name of its own per file, so two configs' model.py never share a module object.
        digest = hashlib.sha1(str(file).encode()).hexdigest()[:8]
        stem = re.sub(r"\W", "_", file.stem)
        name = f"_bif_run_{stem}_{digest}"
        mod_spec = importlib.util.spec_from_file_location(name, file)
        if mod_spec is None or mod_spec.loader is None:
            raise RunConfigError(f"{spec.path}: entry: cannot import {file} as Python.")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            mod_spec.loader.exec_module(module)
        except (ImportError, SyntaxError) as err:
            del sys.modules[name]
            raise RunConfigError(
                f"{spec.path}: entry: importing {file} failed: {type(err).__name__}: {err}."
            ) from err
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if target == missing or target.startswith(missing + "."):
            raise RunConfigError(
                f"{spec.path}: entry = {spec.entry!r}: no module named {missing!r} (searched "
                "the configuration's directory and sys.path); install the package, or name a "
                'file: entry = "path/to/file.py:FUNCTION".'
            ) from err
        raise RunConfigError(
            f"{spec.path}: entry: importing {target!r} failed: {err}; install {missing!r}."
        ) from err
    except (ImportError, SyntaxError) as err:
        raise RunConfigError(
            f"{spec.path}: entry: importing {target!r} failed: {type(err).__name__}: {err}."
        ) from err


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _entry_inputs(spec: RunSpec) -> RunInputs:
    """Call the entry function and check what it returns."""
    assert spec.entry is not None
    target, func_name, is_file = _split_entry(spec.entry)
    with contextlib.ExitStack() as stack:
        # The configuration's folder and the entry file's: the module (and the function, when
        # it imports lazily) can import what lies next to them.
        for folder in {spec.base, *([Path(target).parent] if is_file else [])}:
            stack.enter_context(_on_sys_path(folder))
        module = _import_entry(spec)
        func = getattr(module, func_name, None)
        if func is None:
            own = module.__name__  # list only what the module defines, not what it imports
            names = [
                n for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == own
            ]  # fmt: skip
            raise RunConfigError(
                f"{spec.path}: entry = {spec.entry!r}: {target!r} has no function "
                f"{func_name!r}.{_closest(func_name, names)} Functions there: "
                f"{', '.join(sorted(names)) or 'none'}."
            )
        if not callable(func):
            raise RunConfigError(
                f"{spec.path}: entry = {spec.entry!r}: {func_name!r} is a "
                f"{type(func).__name__}, not a function."
            )
        value = func()
    want = "a dict with 'model', 'train' and 'query' (optionally 'task', 'observable')"
    where = f"{spec.path}: entry = {spec.entry!r} must return {want}"
    if not isinstance(value, Mapping):
        raise RunConfigError(f"{where}; it returned {_describe(value)}.")
    missing = [k for k in ("model", "train", "query") if k not in value]
    if missing:
        raise RunConfigError(
            f"{where}; its dict lacks {', '.join(map(repr, missing))} (its keys: "
            f"{sorted(map(str, value))})."
        )
    for key in value:
        if key not in RETURN_KEYS:
            raise RunConfigError(
                f"{where}; its dict has an unknown key {key!r}.{_closest(str(key), RETURN_KEYS)}"
            )
    if not isinstance(value["model"], nn.Module):
        raise RunConfigError(
            f"{where}; its 'model' is {_describe(value['model'])}, not a torch.nn.Module."
        )
    return RunInputs(
        model=value["model"],
        train=value["train"],
        query=value["query"],
        # The file has the last word: its task/observable override the function's.
        task=spec.task or value.get("task", "classification"),
        observable=spec.observable or value.get("observable"),
    )


def read_jsonl(path: Path) -> tuple[list[str], list[str] | None]:
    """Texts (and prompts, if any line has one) of a JSONL file of ``{"text": ...}`` or
    ``{"prompt": ..., "completion": ...}`` lines; blank lines are skipped.

    A ``text`` line among prompt/completion lines gets the empty prompt (all of it attributed).

    Raises:
        DataError: a line that is not a JSON object of one of those forms (with its number),
            or no line at all.
    """
    texts: list[str] = []
    prompts: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}, column {err.colno}).") from err
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_describe(row)}.")
        form = (
            "text"
            if "text" in row and "prompt" not in row and "completion" not in row
            else "pair"
            if "prompt" in row and "completion" in row and "text" not in row
            else None
        )
        fields = ("text",) if form == "text" else ("prompt", "completion")
        if form is None or not all(isinstance(row[f], str) for f in fields):
            raise DataError(
                f'{where}: a line must be {{"text": "..."}} or {{"prompt": "...", "completion": '
                f'"..."}} with string values; got keys {sorted(row)}.'
            )
        if form == "text":
            texts.append(row["text"])
            prompts.append("")
        else:
            if not row["completion"]:
                raise DataError(f"{where}: empty completion: there would be nothing to attribute.")
            texts.append(row["prompt"] + row["completion"])
            prompts.append(row["prompt"])
        if not texts[-1]:
            raise DataError(f"{where}: empty text.")
    if not texts:
        raise DataError(f"{path} holds no lines; add one JSON object per line.")
    return texts, prompts if any(prompts) else None


def _hf_inputs(spec: RunSpec) -> RunInputs:
    """Load the causal LM and tokenizer offline and encode the JSONL files."""
    assert spec.hf_model is not None and spec.train is not None and spec.query is not None
    from bif.lm.pretrained import _hub_offline
    from bif.lm.task import CausalLMTask, encode

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise RunConfigError(
            f"{spec.path}: hf_model needs transformers; pip install transformers ({err})."
        ) from err
    train_texts, train_prompts = read_jsonl(spec.train)  # data errors before the slow load
    query_texts, query_prompts = read_jsonl(spec.query)
    with _hub_offline():
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.hf_model, local_files_only=True)
            # Eager attention: it runs under vmap and has the double backward of the HVPs that
            # the automatic step size needs (SDPA has neither on CPU); see bif.lm.pretrained.
            model = AutoModelForCausalLM.from_pretrained(
                spec.hf_model, local_files_only=True, attn_implementation="eager"
            )
        except (OSError, ValueError, KeyError) as err:
            raise RunConfigError(
                f"{spec.path}: hf_model = {str(spec.hf_model)!r} is not a loadable Hugging Face "
                f"causal LM with its tokenizer (save both with save_pretrained there): {err}"
            ) from err
    # A KV cache would be built by every forward, and vmap cannot return one.
    model.config.use_cache = False
    model.eval()
    train = encode(tokenizer, train_texts, train_prompts, spec.max_length)
    query = encode(tokenizer, query_texts, query_prompts, spec.max_length)
    return RunInputs(model, train, query, CausalLMTask(), None, tokenizer)


def build_inputs(spec: RunSpec) -> RunInputs:
    """The model and data of a run: the entry's, or the loaded LM and its encoded JSONL files.

    Raises:
        RunConfigError: the entry cannot be imported, has no such function or returns the wrong
            thing; the LM directory cannot be loaded; ``trainable`` matches no parameter.
        DataError: a bad JSONL line.
    """
    inputs = _entry_inputs(spec) if spec.entry is not None else _hf_inputs(spec)
    if spec.trainable is not None:
        from bif.lm.pretrained import freeze_except

        try:
            freeze_except(inputs.model, spec.trainable)
        except ConfigError as err:
            raise RunConfigError(f"{spec.path}: trainable: {err}") from err
    return inputs


# --- running and writing -------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("-inf" if v < 0 else "inf") if math.isinf(v) else "nan" if v != v else repr(v)
    if v is None:
        return '"none"'  # read back as None by the [bif] table (TOML has no null)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # JSON string escapes are valid TOML


def resolved_toml(spec: RunSpec, result: BIFResult) -> str:
    """The configuration as run: absolute paths, and ``[bif]`` holding every field of
    ``result.config`` (automatic values resolved). A valid run configuration itself."""
    top: dict[str, Any] = {
        "entry": spec.entry,
        "hf_model": str(spec.hf_model) if spec.hf_model else None,
        "train": str(spec.train) if spec.train else None,
        "query": str(spec.query) if spec.query else None,
        "task": spec.task,
        "observable": spec.observable,
        "max_length": spec.max_length,
        "trainable": list(spec.trainable) if spec.trainable else None,
        "device": spec.device,
        "out": str(spec.out),
    }
    lines = [
        f"# Written by `bif run` (bif {__version__}) from {spec.path}: the configuration as run,",
        "# automatic [bif] values replaced by the ones chosen.",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None]
    lines += ["", "[bif]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in result.config.to_dict().items()]
    return "\n".join(lines) + "\n"


def _distributed() -> tuple[bool, bool]:
    """``(is_main, initialised_here)``. A launcher (torchrun) that sets WORLD_SIZE > 1 without
    a process group gets one here, so every rank of bif.attribute can talk to the others."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    mine = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        mine = True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0, mine
    return int(os.environ.get("RANK", "0") or 0) == 0, mine


def _write_report(spec: RunSpec, inputs: RunInputs, result: BIFResult, result_dir: Path) -> Path:
    """The page ``bif report`` would build: token heatmaps for a per-token result, else cards."""
    from bif.lm.text import save_lm_text
    from bif.report import write_report
    from bif.report.lm import write_lm_report

    path = spec.out / REPORT_FILE
    source = spec.entry or str(spec.hf_model)
    meta = {"bif run config": str(spec.path), "entry" if spec.entry else "hf_model": source}
    if result.tokens is not None:
        if inputs.tokenizer is not None:
            save_lm_text(
                result_dir, inputs.tokenizer, inputs.train, inputs.query,
                title=f"bif run: {spec.path.name}", report_meta=meta,
            )  # fmt: skip
        return write_lm_report(result_dir, path)
    return write_report(path, result, title=f"bif run: {spec.path.name}", extra_meta=meta)


def run_config(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
) -> RunOutput:
    """Run a configuration file: build the model and data, attribute, write the outputs.

    Args:
        path: the TOML file (see the module docstring).
        overrides: :class:`BIFConfig` fields overriding its ``[bif]`` table.
        out: output directory overriding the file's ``out``.
        progress: show the sampler's progress bar (rank 0 only).

    Returns:
        :class:`RunOutput`. On ranks > 0 of a distributed run nothing is written.
    """
    from bif.api import attribute

    t0 = time.perf_counter()
    spec = load_run_config(path, overrides, out)
    if (spec.out / CONFIG_COPY).resolve() == spec.path:
        raise RunConfigError(
            f"{spec.path}: out = {str(spec.out)!r} would overwrite this file with the resolved "
            f"copy ({CONFIG_COPY}); choose another out directory."
        )
    is_main, mine = _distributed()
    try:
        inputs = build_inputs(spec)
        run_dir = spec.out / RUN_DIR
        try:
            result = attribute(
                inputs.model, inputs.train, inputs.query, task=inputs.task,
                observable=inputs.observable, config=spec.config, device=spec.device,
                progress=progress and is_main, run_dir=run_dir,
            )  # fmt: skip
        except ArtifactError as err:
            if str(run_dir) not in str(err):
                raise
            # The library's advice names run_dir; say what that is for a configuration file.
            raise ArtifactError(
                f"{err} With bif run that is {run_dir}: give another out (or --out), or delete "
                "it to start afresh."
            ) from err
        result_dir = report = config_path = None
        if is_main:
            result_dir = result.save(spec.out / RESULT_DIR)
            report = _write_report(spec, inputs, result, result_dir)
            config_path = spec.out / CONFIG_COPY
            config_path.write_text(resolved_toml(spec, result), encoding="utf-8")
    finally:
        if mine:
            import torch.distributed as dist

            dist.destroy_process_group()
    return RunOutput(
        spec, result, spec.out, result_dir, report, config_path, is_main, time.perf_counter() - t0
    )
