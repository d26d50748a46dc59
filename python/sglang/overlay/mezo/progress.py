"""The trainer's progress: a tqdm bar on a terminal, plain lines elsewhere (a redirected log gets no
cursor movements and no carriage returns)."""

from __future__ import annotations

import sys
from typing import Any, Optional

# Where stderr is not a terminal: a line every this fraction of the run (and at its last step).
LINES_PER_RUN = 50


class Progress:
    """The loss and the last evaluation: a tqdm bar where stderr is a terminal and tqdm is installed,
    else a line ``MeZO step k/N loss=... eval_nll=...`` every ``N / LINES_PER_RUN`` steps and at the last."""

    def __init__(self, total: int, enabled: bool, initial: int = 0) -> None:
        self.total, self.enabled, self.done, self.postfix = total, enabled, initial, {}
        self.bar: Optional[Any] = None
        self.every = max(1, total // LINES_PER_RUN)
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, initial=initial, desc="MeZO", unit="step")

    def update(self, result: Any) -> None:
        self.done += 1
        self.postfix["loss"] = f"{result.loss:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update()
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            self._line(f"step {self.done}/{self.total}")

    def show_eval(self, record: dict) -> None:
        self.postfix["eval_nll"] = f"{record['nll']:.4f}"
        if record.get("accuracy") is not None:
            self.postfix["eval_acc"] = f"{record['accuracy']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)
        elif self.enabled:
            self._line(f"eval after {record['steps_done']} steps")

    def _line(self, what: str) -> None:
        print(f"MeZO {what} " + " ".join(f"{k}={v}" for k, v in self.postfix.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
