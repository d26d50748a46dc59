"""``python -m sglang.overlay.mezo``: MeZO from the command line.

Every flag is generated from a settings dataclass (``Launch`` below, and ``RunConfig`` and
``MeZOConfig`` of ``sglang.overlay.mezo.config``): its name, type, default, bounds and help are
declared once there, as ``HfArgumentParser`` does with princeton-nlp/MeZO's argument classes.
``--help`` needs only the standard library; a run needs sglang's runtime, and says what to install
when it is missing. A user error (a bad flag value, data, model folder) is one ``error:`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from sglang.overlay.families import FAMILIES
from sglang.overlay.mezo.config import MeZOConfig, Requirement, RunConfig, requirements, setting

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Launch:
    """The model, the data and where the run executes."""

    model: str = setting(help="HF model directory (local; save_pretrained output)")
    data: Path = setting(
        help='training data: JSON Lines of {"prompt": ..., "target": ...}, each a list of token '
        "ids or a string tokenized with the model folder's tokenizer"
    )
    batch_size: int = setting(8, "examples per step", minimum=1)
    eval_data: Optional[Path] = setting(
        None, 'held-out JSON Lines: {"prompt", "target"} and/or {"candidates": [...], "gold": i}'
    )
    device: str = setting("auto", "auto: CUDA where torch sees it, else the CPU", choices=("auto", "cpu", "cuda"))
    dtype: Optional[str] = setting(
        None, "the model's dtype (default: float32 on the CPU, the checkpoint's on CUDA)", choices=DTYPES
    )
    mem_fraction_static: Optional[float] = setting(
        None,
        "the fraction of the device's free memory SGLang takes for the weights and the KV pool (default: 0.3 "
        "on CUDA, 0.5 on the CPU)",
        above=0,
        maximum=1,
    )
    prefill_graphs: Optional[int] = setting(
        None,
        "CUDA graphs of the scoring forward for repeated batch shapes (OPT on CUDA; batches padded to a multiple "
        "of 8 tokens so that they share graphs): 0 turns them off; the default keeps one per batch shape of the "
        "data",
        minimum=0,
    )
    tp_size: int = setting(
        1,
        "tensor parallelism: launch with torchrun, tp-size processes per replica; more "
        "processes are data-parallel replicas",
        minimum=1,
    )
    verbose: bool = setting(False, "show every upstream message (default: drop those sglang.overlay.quiet.NOISE lists)")


SECTIONS = ((Launch, "model and data"), (RunConfig, "the run"), (MeZOConfig, "MeZO"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_parser(requirement: Requirement):
    """argparse's ``type`` for a field: the text as the field's kind, checked against its bounds."""

    def parse(text: str) -> Any:
        try:
            value = requirement.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement.describe()}, got {text!r}") from None
        if not requirement.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {requirement.describe()}, got {value!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The parser, one flag per command-line field of ``SECTIONS``."""
    parser = argparse.ArgumentParser(
        prog="python -m sglang.overlay.mezo",
        description="MeZO (zeroth-order SGD) on SGLang's in-process runner. Model families: "
        + ", ".join(FAMILIES.values())
        + " (tested on every release 0.5.13 - 0.5.23 that runs on the CPU, and on the GPU with 0.5.23).",
    )
    for cls, title in SECTIONS:
        group = parser.add_argument_group(title, cls.__doc__.split("\n")[0])
        for f, requirement in zip(dataclasses.fields(cls), requirements(cls).values()):
            if not f.metadata["cli"]:
                continue
            help_text, required = f.metadata["help"], f.default is MISSING
            if requirement.kind is bool:
                if f.default:
                    group.add_argument(
                        _flag(f"no_{f.name}"), dest=f.name, action="store_false", help=f"do not {help_text}"
                    )
                else:
                    group.add_argument(_flag(f.name), action="store_true", help=help_text)
                continue
            if not required and f.default is not None:
                shown = ", ".join(f.default) if requirement.kind is tuple else f.default
                help_text += f" (default: {shown})"
            kwargs = dict(nargs="+") if requirement.kind is tuple else {}
            if requirement.kind is tuple:
                requirement = requirement._replace(kind=str)
            group.add_argument(
                _flag(f.name),
                type=_value_parser(requirement),
                required=required,
                default=None if required else f.default,
                help=help_text,
                metavar=f.name.upper(),
                **kwargs,
            )
    return parser


def _numeric_flags() -> set[str]:
    return {_flag(name) for cls, _ in SECTIONS for name, r in requirements(cls).items() if r.kind in (int, float)}


def _join_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--eps -1e-3`` as ``--eps=-1e-3`` for every numeric flag: argparse takes ``-1e-3`` for an option,
    not a number, and would say "expected one argument" instead of what is wrong with the value."""
    numeric, out, args = _numeric_flags(), [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in numeric and args and args[0].startswith("-"):
            try:
                float(args[0])
            except ValueError:
                pass
            else:
                arg = f"{arg}={args.pop(0)}"
        out.append(arg)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Launch, RunConfig, MeZOConfig]:
    """The three settings objects of a command line (argparse exits with a one-line error on a bad flag)."""
    values = vars(build_parser().parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else argv)))

    def pick(cls: type) -> dict[str, Any]:
        return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.metadata["cli"]}

    run = RunConfig(**pick(RunConfig))
    mezo = pick(MeZOConfig)
    mezo["lora_targets"] = tuple(mezo["lora_targets"])
    total = run.steps if mezo["lr_schedule"] == "linear" else None
    return Launch(**pick(Launch)), run, MeZOConfig(**mezo, total_steps=total)


def _runtime() -> None:
    """SystemExit saying what to install where sglang's runtime (torch, sglang's own modules) is missing."""
    try:
        import torch  # noqa: F401

        import sglang.srt.server_args  # noqa: F401
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"error: the MeZO trainer needs sglang's runtime, and {error.name!r} is not installed here ({error}). "
            "Install the fork with its dependencies (pip install . on a GPU machine), or on a CPU machine run it "
            "from the tool's venv: PY=$(python3 scripts/overlay.py venv 0.5.23 DIR); $PY -m sglang.overlay.mezo "
            '(README, "Installing the patched fork with pip")'
        ) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    launch, run_config, config = parse_args(argv)
    _runtime()
    from sglang.overlay.config import SettingError
    from sglang.overlay.mezo.data import ModelLimits, file_sha256, load_batches, load_eval_examples
    from sglang.overlay.mezo.dp import launch_layout
    from sglang.overlay.mezo.run import plan_resume, run_training
    from sglang.overlay.mezo.trainer import MeZO
    from sglang.overlay.runner import StandaloneRunner

    try:
        config.validate()
        run_config.validate()
        if run_config.eval_every is not None and launch.eval_data is None:
            raise ValueError("--eval-every needs --eval-data FILE (held-out examples)")
        if (run_config.save_every is not None or run_config.resume) and launch.tp_size > 1:
            raise ValueError("checkpoints (--save-every, --resume) need --tp-size 1 (data parallelism is fine)")
        dp, runner_config = launch_layout(launch.model, launch.device, launch.dtype, launch.tp_size)
        runner_config = dataclasses.replace(
            runner_config,
            log_level="verbose" if launch.verbose else "quiet",
            mem_fraction_static=launch.mem_fraction_static,
            prefill_graphs=launch.prefill_graphs,
        )
        runner_config = runner_config.resolved()  # validated once, config.json read once
        limits = ModelLimits.of(runner_config.checkpoint_config())
        batches = load_batches(launch.data, launch.batch_size, launch.model, limits)
        examples = load_eval_examples(launch.eval_data, launch.model, limits) if launch.eval_data else None
        run = {
            "data_sha256": file_sha256(launch.data),
            "batch_size": launch.batch_size,
            "examples": sum(len(b.prompts) for b in batches),
        }
        plan_resume(run_config.out, run_config.resume, dataclasses.asdict(config), run)  # before the model is built
        with StandaloneRunner(runner_config) as runner:
            trainer = MeZO(runner, config, data_parallel=dp)
            results = run_training(trainer, batches, run_config, eval_examples=examples, run=run)
            out = trainer.save_pretrained(run_config.out)
    except SettingError as error:  # a RunnerConfig field: named by its flag
        flags = {f.name for f in dataclasses.fields(Launch)}
        raise SystemExit(f"error: {error.named(_flag(error.field)) if error.field in flags else error}") from None
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if not trainer.lead:
        return 0
    (out / "mezo_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    print(
        f"saved {out} after {trainer.steps_done} steps; last loss {results[-1].loss:.4f}"
        if results
        else f"saved {out} after {trainer.steps_done} steps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
