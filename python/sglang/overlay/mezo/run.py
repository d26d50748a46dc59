"""A MeZO run that survives: the step log, periodic checkpoints, resume, evaluation, the progress bar.

:func:`run_training` is what ``python -m sglang.overlay.mezo`` does between building
the trainer and saving the final checkpoint, for a run of ``steps`` steps in all:

- ``OUT/mezo_log.jsonl`` gets one JSON line per step (``{"kind": "step", ...}``, the
  StepResult) and per evaluation (``{"kind": "eval", "steps_done": k, "nll": ...,
  "accuracy": ..., ...}``), each flushed when written;
- with ``save_every`` K, a checkpoint ``OUT/checkpoints/step-NNNNNN`` after every K
  steps and after the last (:mod:`sglang.overlay.mezo.checkpoint`; ``keep_checkpoints``
  N keeps the N newest);
- with ``eval_examples``: an evaluation before the first step, after every
  ``eval_every`` steps, and after the last step (once per step count);
- ``resume``: continue from the newest complete checkpoint under ``OUT/checkpoints``
  (none: start at step 0). The log keeps its step lines before the checkpoint's
  step count and its eval lines before that count, and drops the rest (what a
  crash left after the checkpoint); the evaluation at the checkpoint's step count,
  if one is due, runs again on the restored weights. A resumed run so writes the
  same log and weights as one that was never interrupted. Without ``resume``, an
  ``OUT`` that already holds checkpoints is refused.

Under tensor or data parallelism every rank runs the same code (every forward is
a collective of its tensor-parallel group); only the trainer's lead rank writes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from sglang.overlay.mezo import checkpoint as ckpt
from sglang.overlay.mezo.config import RunConfig, StepResult
from sglang.overlay.mezo.data import Batch, EvalExample
from sglang.overlay.mezo.progress import Progress

if TYPE_CHECKING:
    from sglang.overlay.mezo.trainer import MeZO

LOG_FILE = "mezo_log.jsonl"
CHECKPOINTS = "checkpoints"


class StepLog:
    """The run's JSON Lines log, appended and flushed line by line. ``resume_at`` c keeps the step
    lines of steps < c and the eval lines of step counts < c (a torn last line is dropped); None
    starts an empty log."""

    def __init__(self, path: str | Path, resume_at: Optional[int] = None) -> None:
        self.path = Path(path)
        kept = []
        if resume_at is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                count = record.get("step") if record.get("kind") == "step" else record.get("steps_done")
                if isinstance(count, int) and count < resume_at:
                    kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self.handle = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def sync(self) -> None:
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def read_log(path: str | Path) -> list[dict]:
    """The records of a step log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plan_resume(out: str | Path, resume: bool, config: dict, run: Optional[dict]) -> Optional[Path]:
    """The checkpoint a run in ``out`` continues from (None: it starts at step 0), checked against
    ``config`` and ``run`` before anything is built. ValueError: a fresh run in an ``out`` that has
    checkpoints, or a checkpoint of other settings."""
    root = Path(out) / CHECKPOINTS
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        return None
    if not resume:
        raise ValueError(
            f"--out {out} already holds checkpoints of a run ({latest.name}): pass --resume to "
            "continue it, or choose another --out"
        )
    ckpt.check_compatible(ckpt.read_state(latest), config, None, run, latest)
    return latest


def run_training(
    trainer: MeZO,
    batches: Sequence[Batch],
    config: RunConfig,
    *,
    eval_examples: Optional[Sequence[EvalExample]] = None,
    run: Optional[dict] = None,
    callback: Optional[Callable[[StepResult], None]] = None,
) -> list[StepResult]:
    """Train ``trainer`` to ``config.steps`` steps in all, logging, evaluating and checkpointing under
    ``config.out`` (see the module docstring); ``run``: facts a resume must match (data hash, batch size);
    ``callback(result)`` after each step's log line, eval and checkpoint. Returns this call's StepResults.

    Every rank of a tensor- or data-parallel run calls it, and each takes part in every forward
    (evaluations included); the trainer's lead rank alone writes the log and the checkpoints."""
    config.validate()
    if config.eval_every is not None and not eval_examples:
        raise ValueError("--eval-every needs held-out examples: give --eval-data FILE")
    out, lead = Path(config.out), trainer.lead
    root = out / CHECKPOINTS
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temps(root)
    latest = plan_resume(out, config.resume, asdict(trainer.config), run)
    state = trainer.load_checkpoint(latest, run) if latest is not None else {"extra": {}}
    start, steps = trainer.steps_done, config.steps
    if start > steps:
        raise ValueError(f"{latest} has {start} steps done, more than --steps {steps}: give --steps >= {start}")
    if latest is not None and lead:
        print(f"MeZO: resuming from {latest} ({start} of {steps} steps done)", file=sys.stderr, flush=True)
    log = StepLog(out / LOG_FILE, resume_at=start) if lead else None
    bar = Progress(steps, config.progress and lead, initial=start)
    last_eval = dict(state["extra"].get("last_eval") or {})
    if last_eval:
        bar.show_eval(last_eval)

    def run_eval() -> None:
        result = trainer.evaluate(eval_examples, config.eval_batch_size)
        last_eval.clear()
        last_eval.update(kind="eval", steps_done=trainer.steps_done, **result.summary())
        if log is not None:
            log.write(dict(last_eval))
        bar.show_eval(last_eval)

    def due(count: int) -> bool:
        every = config.eval_every
        return bool(eval_examples) and (count == 0 or (every is not None and count % every == 0))

    def save() -> None:
        if not lead:
            return
        log.sync()
        done = trainer.steps_done
        extra = {
            "last_eval": dict(last_eval),
            "batches": len(batches),
            "next_batch": done % len(batches),
            "order": "file order: step k trains on batch k % batches",
        }
        trainer.save_checkpoint(root / ckpt.checkpoint_name(done), run, extra)
        if config.keep_checkpoints is not None:
            ckpt.prune(root, config.keep_checkpoints)

    def on_step(result: StepResult) -> None:
        if log is not None:
            log.write({"kind": "step", **asdict(result)})
        bar.update(result)
        if due(trainer.steps_done):
            run_eval()
        if config.save_every is not None and trainer.steps_done % config.save_every == 0:
            save()
        if callback is not None:
            callback(result)

    try:
        if due(start):
            run_eval()
        results = trainer.train(batches, steps - start, progress=False, callback=on_step)
        if eval_examples and last_eval.get("steps_done") != steps:
            run_eval()
        if config.save_every is not None and steps % config.save_every != 0 and steps > start:
            save()  # the last step too, so a finished run can be extended (--resume with more --steps)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return results
