"""MeZO's training data: JSON Lines of prompt / target pairs, checked against the model before any step.

Each line is ``{"prompt": ..., "target": ...}``, each a list of token ids or a
string tokenized with the model folder's tokenizer. Every problem is a
``ValueError`` naming the file and the line: bad JSON, a missing field, text
without a usable tokenizer, a token id outside the model's vocabulary, a pair
longer than its context. Nothing is trained on data that does not pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional


class Batch(NamedTuple):
    """Token ids: one prompt and one target per example; the loss is over the targets."""

    prompts: list[list[int]]
    targets: list[list[int]]


def model_limits(model_dir: str) -> tuple[int, int]:
    """(vocab size, context length) from the model folder's config.json."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {model_dir}: cannot read {config_path} ({error}); give a local HF model folder") \
            from None
    return int(config["vocab_size"]), int(config.get("max_position_embeddings") or 1 << 62)


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
            raise ValueError(f"{where}: {field}[{i}] = {token} is not a token id of the model: ids must be in "
                             f"[0, {vocab})")
    return value


def load_batches(path: Path, batch_size: int, model_dir: str) -> list[Batch]:
    """Batches of ``batch_size`` from a JSON Lines file of {"prompt": ..., "target": ...}, every
    example checked against the model in ``model_dir`` first."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"--data {path}: {error.strerror or error}") from None
    vocab, context = model_limits(model_dir)
    tokenize = _Tokenizer(model_dir)
    examples: list[tuple[list[int], list[int]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or "prompt" not in record or "target" not in record:
            raise ValueError(f"{where}: each line must be an object with 'prompt' and 'target'")
        pair = []
        for field, special in (("prompt", True), ("target", False)):
            value = record[field]
            if isinstance(value, str):
                value = tokenize(value, where, special)
            pair.append(_token_ids(value, field, where, vocab))
        prompt, target = pair
        if len(prompt) + len(target) > context:
            raise ValueError(f"{where}: prompt + target is {len(prompt) + len(target)} tokens, more than the "
                             f"model's context length {context}")
        examples.append((prompt, target))
    if not examples:
        raise ValueError(f"{path} has no examples")
    return [Batch([p for p, _ in chunk], [t for _, t in chunk])
            for chunk in (examples[i : i + batch_size] for i in range(0, len(examples), batch_size))]
