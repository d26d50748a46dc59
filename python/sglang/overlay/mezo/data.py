"""MeZO's training data: JSON Lines of prompt / target pairs, checked against the model before any step.

Each line is ``{"prompt": ..., "target": ...}``, each a list of token ids or a
string tokenized with the model folder's tokenizer. Every problem is a
``ValueError`` naming the file and the line: bad JSON, a missing field, text
without a usable tokenizer, a token id outside the model's vocabulary, a pair
longer than its context. Nothing is trained on data that does not pass.

Held-out data (``--eval-data``, :func:`load_eval_examples`) is checked the same
way; its lines may also list ``"candidates"`` (each a target) and ``"gold"`` (the
index of the right one) for the paper's prompt-based classification accuracy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional


class Batch(NamedTuple):
    """Token ids: one prompt and one target per example; the loss is over the targets."""

    prompts: list[list[int]]
    targets: list[list[int]]


class ModelLimits(NamedTuple):
    """What every example must fit: token ids in [0, vocab_size), at most context_len tokens."""

    vocab_size: int
    context_len: int

    @classmethod
    def of(cls, config: dict) -> "ModelLimits":
        """The limits a model's parsed config.json states (``RunnerConfig.checkpoint_config()``)."""
        context = config.get("max_position_embeddings") or config.get("n_positions") or 1 << 62
        return cls(int(config["vocab_size"]), int(context))

    @classmethod
    def read(cls, model_dir: str) -> "ModelLimits":
        """The limits of the model folder's config.json."""
        config_path = Path(model_dir) / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"--model {model_dir}: cannot read {config_path} ({error}); give a local HF model folder"
            ) from None
        return cls.of(config)


class _Tokenizer:
    """The model folder's tokenizer, loaded on first use."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.tokenizer: Optional[Any] = None

    def __call__(self, text: str, where: str, special: bool) -> list[int]:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            except (OSError, ValueError, TypeError) as error:
                raise ValueError(
                    f"{where}: the example is text, but {self.model_dir} has no usable tokenizer ({error}); give "
                    "token ids, or save the tokenizer beside the model (tokenizer.save_pretrained)"
                ) from None
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if text and not ids:
            raise ValueError(
                f"{where}: the tokenizer of {self.model_dir} turned {text[:40]!r} into no tokens: the folder has no "
                "tokenizer files (tokenizer.json, vocab.json + merges.txt, ...); save the tokenizer beside the model "
                "or give token ids"
            )
        return ids


def _token_ids(value: Any, field: str, where: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of token ids or a string, got {value!r:.60}")
    for i, token in enumerate(value):
        if not isinstance(token, int) or isinstance(token, bool):
            raise ValueError(f"{where}: {field}[{i}] is {token!r:.30}, not an int token id")
        if not 0 <= token < vocab:
            raise ValueError(
                f"{where}: {field}[{i}] = {token} is not a token id of the model: ids must be in [0, {vocab})"
            )
    return value


def _records(path: Path, flag: str) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for every non-blank line of a JSON Lines file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{flag} {path}: {error.strerror or error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        yield where, record


class _Checker:
    """Turns a field (token ids or text) into checked token ids of the model in ``model_dir``."""

    def __init__(self, model_dir: str, limits: Optional[ModelLimits]) -> None:
        self.vocab, self.context = limits or ModelLimits.read(model_dir)
        self.tokenize = _Tokenizer(model_dir)

    def ids(self, value: Any, field: str, where: str, special: bool) -> list[int]:
        if isinstance(value, str):
            value = self.tokenize(value, where, special)
        return _token_ids(value, field, where, self.vocab)

    def fits(self, prompt: list[int], target: list[int], what: str, where: str) -> None:
        if len(prompt) + len(target) > self.context:
            raise ValueError(
                f"{where}: prompt + {what} is {len(prompt) + len(target)} tokens, more than the "
                f"model's context length {self.context}"
            )


def load_batches(path: Path, batch_size: int, model_dir: str, limits: Optional[ModelLimits] = None) -> list[Batch]:
    """Batches of ``batch_size`` from a JSON Lines file of {"prompt": ..., "target": ...}, every
    example checked against the model in ``model_dir`` first (``limits``: its vocabulary and context,
    read from its config.json when None). Step k trains on batch k % len(batches)."""
    check = _Checker(model_dir, limits)
    examples: list[tuple[list[int], list[int]]] = []
    for where, record in _records(path, "--data"):
        if not isinstance(record, dict) or "prompt" not in record or "target" not in record:
            raise ValueError(f"{where}: each line must be an object with 'prompt' and 'target'")
        prompt = check.ids(record["prompt"], "prompt", where, True)
        target = check.ids(record["target"], "target", where, False)
        check.fits(prompt, target, "target", where)
        examples.append((prompt, target))
    if not examples:
        raise ValueError(f"{path} has no examples")
    return [
        Batch([p for p, _ in chunk], [t for _, t in chunk])
        for chunk in (examples[i : i + batch_size] for i in range(0, len(examples), batch_size))
    ]


class EvalExample(NamedTuple):
    """A held-out example: its NLL is over ``target`` (or the gold candidate where ``target`` is None);
    with ``candidates``, the prediction is the candidate of highest total log-likelihood."""

    prompt: list[int]
    target: Optional[list[int]]
    candidates: list[list[int]]
    gold: Optional[int]

    @property
    def nll_target(self) -> list[int]:
        return self.target if self.target is not None else self.candidates[self.gold]


def load_eval_examples(path: Path, model_dir: str, limits: Optional[ModelLimits] = None) -> list[EvalExample]:
    """Held-out examples from a JSON Lines file, checked like the training data. Each line has a
    "prompt" and a "target", or "candidates" (a non-empty list of targets: token ids or text) with
    "gold" (the index of the right one), or all three."""
    check = _Checker(model_dir, limits)
    examples: list[EvalExample] = []
    for where, record in _records(path, "--eval-data"):
        if not isinstance(record, dict) or "prompt" not in record or not ("target" in record or "candidates" in record):
            raise ValueError(
                f"{where}: each line must be an object with 'prompt' and 'target', or 'prompt', 'candidates' and 'gold'"
            )
        if ("candidates" in record) != ("gold" in record):
            raise ValueError(
                f"{where}: 'candidates' and 'gold' go together: give both (gold is the index of the "
                "right candidate) or neither"
            )
        prompt = check.ids(record["prompt"], "prompt", where, True)
        target = None
        if "target" in record:
            target = check.ids(record["target"], "target", where, False)
            check.fits(prompt, target, "target", where)
        candidates, gold = [], None
        if "candidates" in record:
            values, gold = record["candidates"], record["gold"]
            if not isinstance(values, list) or not values:
                raise ValueError(
                    f"{where}: 'candidates' must be a non-empty list of targets (token id lists or "
                    f"strings), got {values!r:.60}"
                )
            for i, value in enumerate(values):
                if not isinstance(value, (str, list)):
                    raise ValueError(
                        f"{where}: candidates[{i}] is {value!r:.30}: each candidate is a target, a "
                        "list of token ids or a string"
                    )
                candidates.append(check.ids(value, f"candidates[{i}]", where, False))
                check.fits(prompt, candidates[-1], f"candidates[{i}]", where)
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(candidates):
                raise ValueError(
                    f"{where}: 'gold' must be the index of the right candidate, an int in "
                    f"[0, {len(candidates)}), got {gold!r:.30}"
                )
        examples.append(EvalExample(prompt, target, candidates, gold))
    if not examples:
        raise ValueError(f"{path} has no examples")
    return examples


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (a resumed run checks that its data did not change)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
