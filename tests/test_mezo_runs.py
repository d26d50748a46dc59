"""MeZO as people run it: checkpoints and exact resume, the step log, evaluation, n-SPSA, lr schedule, the CLI.

CPU fp32 throughout: a resumed run must end bit-identical (torch.equal) to an
uninterrupted one, with the same log; evaluation must equal HF's scores on the
same weights; n-SPSA must equal single-sample gradients averaged (the HF
reference of tests/support/mezo_reference.py, to 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mezo import EVAL, eval_examples

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
PROMPTS = [[2, 10, 20, 30, 31], [2, 7, 8], [2, 100, 101, 102], [2, 5]]
TARGETS = [[40, 50, 60], [8, 9, 10, 11], [102, 103], [6, 7, 300]]
BATCHES = [(PROMPTS[:2], TARGETS[:2]), (PROMPTS[2:], TARGETS[2:])]


def runner(model_dir: Path):
    from sglang.overlay import RunnerConfig, StandaloneRunner

    return StandaloneRunner(RunnerConfig(model_path=str(model_dir), device="cpu"))


def hf_state(trainer) -> dict:
    return trainer.hf_state_dict()


def assert_equal_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


class Crash(Exception):
    pass


RESUME_VARIANTS = {
    "full_wd_linear_2_samples": dict(
        lr=1e-4, eps=1e-2, seed=5, weight_decay=0.1, lr_schedule="linear", total_steps=6, n_samples=2
    ),
    "lora": dict(lr=1e-2, eps=1e-2, seed=7, lora_rank=4, lora_alpha=8.0),
}


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_a_crashed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(variant, tiny_opt, tmp_path) -> None:
    from sglang.overlay.mezo import MeZO, MeZOConfig, RunConfig
    from sglang.overlay.mezo.run import read_log, run_training

    config = MeZOConfig(**RESUME_VARIANTS[variant])
    opts = dict(eval_examples=eval_examples(), run={"data": "x"})

    def settings(out: str, resume: bool = False) -> RunConfig:
        return RunConfig(steps=6, out=tmp_path / out, save_every=2, eval_every=3, progress=False, resume=resume)

    with runner(tiny_opt) as r:
        whole = MeZO(r, config)
        run_training(whole, BATCHES, settings("whole"), **opts)
        expected = hf_state(whole)

    def crash_after_step_4(result) -> None:  # step index 4: after the checkpoint at 4 steps, a log line past it
        if result.step == 4:
            raise Crash

    with runner(tiny_opt) as r, pytest.raises(Crash):
        run_training(MeZO(r, config), BATCHES, settings("parts"), callback=crash_after_step_4, **opts)
    assert [p.name for p in sorted((tmp_path / "parts" / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    with runner(tiny_opt) as r:
        resumed = MeZO(r, config)
        results = run_training(resumed, BATCHES, settings("parts", resume=True), **opts)
        assert [res.step for res in results] == [4, 5]
        assert_equal_weights(hf_state(resumed), expected)
    log = read_log(tmp_path / "whole" / "mezo_log.jsonl")
    assert read_log(tmp_path / "parts" / "mezo_log.jsonl") == log
    assert [(x["kind"], x.get("step", x.get("steps_done"))) for x in log] == [
        ("eval", 0),
        ("step", 0),
        ("step", 1),
        ("step", 2),
        ("eval", 3),
        ("step", 3),
        ("step", 4),
        ("step", 5),
        ("eval", 6),
    ]
    if config.lr_schedule == "linear":
        assert [x["lr"] for x in log if x["kind"] == "step"] == [config.lr * (1 - k / 6) for k in range(6)]


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_an_out_with_checkpoints(tiny_opt, tmp_path) -> None:
    from dataclasses import asdict, replace

    from sglang.overlay.mezo import MeZO, MeZOConfig
    from sglang.overlay.mezo.run import plan_resume

    config = MeZOConfig(lr=1e-4, eps=1e-2, seed=3)
    run = {"data_sha256": "aa", "batch_size": 2, "examples": 4}
    with runner(tiny_opt) as r:
        trainer = MeZO(r, config)
        trainer.step(*BATCHES[0])
        trainer.save_checkpoint(tmp_path / "out" / "checkpoints" / "step-000001", run)
    out = tmp_path / "out"
    assert plan_resume(out, True, asdict(config), run).name == "step-000001"
    changes = [
        (dict(lr=2e-4), {}, r"lr: checkpoint 0.0001, this run 0.0002"),
        (dict(eps=1e-3), {}, r"eps: checkpoint 0.01, this run 0.001"),
        (dict(seed=4), {}, r"seed: checkpoint 3, this run 4"),
        (dict(lora_rank=2), {}, r"lora_rank: checkpoint None, this run 2"),
        (dict(n_samples=2), {}, r"n_samples: checkpoint 1, this run 2"),
        (dict(z_rounds=7), {}, r"z_rounds: checkpoint 10, this run 7"),
        ({}, dict(batch_size=4), r"batch_size: checkpoint 2, this run 4"),
        ({}, dict(data_sha256="bb"), r"data_sha256: checkpoint 'aa', this run 'bb'"),
    ]
    for fields, facts, message in changes:
        with pytest.raises(ValueError, match=rf"cannot resume from .*step-000001: .*{message}"):
            plan_resume(out, True, asdict(replace(config, **fields)), {**run, **facts})
    with pytest.raises(ValueError, match=r"already holds checkpoints of a run \(step-000001\): pass --resume"):
        plan_resume(out, False, asdict(config), run)
    # A checkpoint from before z_rounds was a setting drew z with 10 rounds: it resumes as 10, not as 7.
    state_file = out / "checkpoints" / "step-000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["mezo_config"]["z_rounds"]
    state_file.write_text(json.dumps(state))
    assert plan_resume(out, True, asdict(config), run).name == "step-000001"
    with pytest.raises(ValueError, match=r"z_rounds: checkpoint 10, this run 7"):
        plan_resume(out, True, asdict(replace(config, z_rounds=7)), run)
    with runner(tiny_opt) as r, pytest.raises(ValueError, match=r"lr: checkpoint 0.0001, this run 0.0002"):
        MeZO(r, replace(config, lr=2e-4)).load_checkpoint(out / "checkpoints" / "step-000001")


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tiny_opt, tmp_path, monkeypatch) -> None:
    from sglang.overlay.mezo import MeZO, MeZOConfig
    from sglang.overlay.mezo import checkpoint as mezo_checkpoint

    root = tmp_path / "checkpoints"
    config = MeZOConfig(lr=1e-4, eps=1e-2, seed=2)
    with runner(tiny_opt) as r:
        trainer = MeZO(r, config)
        trainer.train(BATCHES, 2, progress=False)
        saved = hf_state(trainer)
        trainer.save_checkpoint(root / "step-000002")
        trainer.train(BATCHES, 2, progress=False)

        def killed(path, state):
            raise KeyboardInterrupt

        monkeypatch.setattr(mezo_checkpoint, "_write_state", killed)
        with pytest.raises(KeyboardInterrupt):
            trainer.save_checkpoint(root / "step-000004")
        with pytest.raises(KeyboardInterrupt):  # over an existing checkpoint: the old one stays
            trainer.save_checkpoint(root / "step-000002")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    (root / ".tmp-step-000006-killed").mkdir()  # what a killed process leaves
    (root / ".tmp-step-000006-killed" / "model.safetensors").write_bytes(b"\0" * 10)
    assert mezo_checkpoint.latest_checkpoint(root) == root / "step-000002"
    with runner(tiny_opt) as r:
        again = MeZO(r, config)
        assert again.load_checkpoint(mezo_checkpoint.latest_checkpoint(root))["steps_done"] == 2
        assert again.steps_done == 2
        assert_equal_weights(hf_state(again), saved)
    mezo_checkpoint.remove_stale_temps(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]


def test_the_log_is_written_and_flushed_at_every_step_and_a_finished_run_can_be_extended(tiny_opt, tmp_path) -> None:
    from sglang.overlay.mezo import MeZO, MeZOConfig, RunConfig
    from sglang.overlay.mezo.run import read_log, run_training

    seen = []
    config = MeZOConfig(lr=1e-4, eps=1e-2)
    with runner(tiny_opt) as r:
        trainer = MeZO(r, config)
        results = run_training(
            trainer,
            BATCHES,
            RunConfig(steps=3, out=tmp_path, progress=False, save_every=2),
            callback=lambda result: seen.append(read_log(tmp_path / "mezo_log.jsonl")),
        )
    assert [[x["step"] for x in log] for log in seen] == [[0], [0, 1], [0, 1, 2]]
    assert seen[-1] == [{"kind": "step", **result.__dict__} for result in results]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    plain = tmp_path / "made-by-mkdir"
    plain.mkdir()
    for folder in (tmp_path / "checkpoints" / "step-000002", tmp_path / "checkpoints"):
        assert folder.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, "a checkpoint folder's mode is mkdir's"
    with runner(tiny_opt) as r:  # the last step was saved too: --resume with more --steps continues from it
        more = run_training(MeZO(r, config), BATCHES, RunConfig(steps=5, out=tmp_path, progress=False, resume=True))
    assert [res.step for res in more] == [3, 4]
    assert [x["step"] for x in read_log(tmp_path / "mezo_log.jsonl")] == [0, 1, 2, 3, 4]


def hf_scores(model):
    """HF's total log-likelihood of every (prompt, target) of EVAL, and the token-mean NLL of the targets;
    ``model``: an OPTForCausalLM or the folder of one."""
    import torch
    from transformers import OPTForCausalLM

    if isinstance(model, Path):
        model = OPTForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def loglik(prompt, target):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None]).sum().item()

    total = sum(loglik(e["prompt"], e.get("target") or e["candidates"][e["gold"]]) for e in EVAL)
    tokens = sum(len(e.get("target") or e["candidates"][e["gold"]]) for e in EVAL)
    picks = [
        max(range(len(e["candidates"])), key=lambda i: loglik(e["prompt"], e["candidates"][i]))
        if "candidates" in e
        else None
        for e in EVAL
    ]
    return -total / tokens, picks


def test_evaluation_equals_hf_scores_on_the_same_weights(tiny_opt, tmp_path) -> None:
    from sglang.overlay.mezo import MeZO, MeZOConfig

    with runner(tiny_opt) as r:
        trainer = MeZO(r, MeZOConfig(lr=1e-2, eps=1e-2, seed=1, lora_rank=2))
        trainer.train(BATCHES, 3, progress=False)
        result = trainer.evaluate(eval_examples(), batch_size=3)
        before = hf_state(trainer)
        trainer.save_pretrained(tmp_path / "hf")
        assert_equal_weights(hf_state(trainer), before)  # no perturbation left behind
    nll, picks = hf_scores(tmp_path / "hf")
    assert abs(result.nll - nll) < TOL, (result.nll, nll)
    assert result.predictions == tuple(picks)
    right = [p == e["gold"] for p, e in zip(picks, EVAL) if "candidates" in e]
    assert result.accuracy == sum(right) / len(right)
    assert (result.examples, result.tokens) == (4, 2 + 2 + 3 + 1)


def test_evaluations_during_a_run_score_the_trained_weights(tiny_opt, tmp_path) -> None:
    """run_training evaluates between steps, while train() holds each step's update deferred (one sample a
    step): every evaluation must still score θ. Each logged NLL and accuracy equals HF's on the independent
    reference's weights after the same steps (tests/support/mezo_reference.py), not the code compared with
    itself."""
    from sglang.overlay.mezo import MeZO, MeZOConfig, RunConfig
    from sglang.overlay.mezo.run import read_log, run_training
    from tests.support.mezo_reference import ReferenceMeZO

    hyper = dict(lr=1e-3, eps=1e-2, seed=8)
    with runner(tiny_opt) as r:
        run_training(
            MeZO(r, MeZOConfig(**hyper)),
            BATCHES,
            RunConfig(steps=3, out=tmp_path, eval_every=1, progress=False),
            eval_examples=eval_examples(),
        )
    evals = [x for x in read_log(tmp_path / "mezo_log.jsonl") if x["kind"] == "eval"]
    assert [x["steps_done"] for x in evals] == [0, 1, 2, 3]
    reference = ReferenceMeZO(tiny_opt, **hyper)
    for k, logged in enumerate(evals):
        nll, picks = hf_scores(reference.model)
        right = [p == e["gold"] for p, e in zip(picks, EVAL) if "candidates" in e]
        assert abs(logged["nll"] - nll) < TOL, (k, logged["nll"], nll)
        assert logged["accuracy"] == sum(right) / len(right)
        if k < 3:
            reference.step(*BATCHES[k % 2])


def test_accuracy_takes_the_candidate_of_highest_total_not_mean_log_likelihood(tiny_opt) -> None:
    """Candidates where the rules disagree, built from HF's own distribution on the same weights: A is the
    least likely single token after the prompt, B three greedy tokens (each likelier than A, so B's mean
    is higher, but their product lower). The paper's rule, the total, picks A; a per-token mean would pick B."""
    import torch
    from transformers import OPTForCausalLM

    from sglang.overlay.mezo.data import EvalExample
    from sglang.overlay.mezo.eval import evaluate

    hf = OPTForCausalLM.from_pretrained(tiny_opt, dtype=torch.float32).eval()
    prompt = [2, 40, 41, 42]

    def logprobs(seq):
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([seq])).logits[0], -1)

    first = logprobs(prompt)[-1]
    a = [int(first.argmin())]
    b = []
    for _ in range(3):
        b.append(int(logprobs(prompt + b)[-1].argmax()))
    score = lambda c: [float(logprobs(prompt + c)[len(prompt) - 1 + i, t]) for i, t in enumerate(c)]  # noqa: E731
    assert sum(score(b)) < sum(score(a)) and sum(score(b)) / 3 > sum(score(a)), "the rules must disagree here"
    with runner(tiny_opt) as r:
        result = evaluate(r, [EvalExample(prompt, None, [b, a], 1), EvalExample(prompt, None, [a, b], 0)])
    assert result.predictions == (1, 0) and result.accuracy == 1.0


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": [2, 3], "candidates": [], "gold": 0}, r"eval.jsonl:2: 'candidates' must be a non-empty list"),
        (
            {"prompt": [2, 3], "candidates": [[4], [5]], "gold": 2},
            r"eval.jsonl:2: 'gold' must be the index of the "
            r"right candidate, an int in \[0, 2\), got 2",
        ),
        ({"prompt": [2, 3], "candidates": [[4]]}, r"eval.jsonl:2: 'candidates' and 'gold' go together"),
        ({"prompt": [2, 3], "candidates": [4, 5], "gold": 0}, r"eval.jsonl:2: candidates\[0\] is 4: each candidate"),
        (
            {"prompt": [2, 3], "candidates": [[4], [512]], "gold": 0},
            r"eval.jsonl:2: candidates\[1\]\[0\] = 512 is not a token id of the model",
        ),
        ({"prompt": [2, 3]}, r"eval.jsonl:2: each line must be an object with 'prompt' and 'target', or"),
        (
            {"prompt": [2] * 120, "candidates": [[4], [5] * 9], "gold": 0},
            r"eval.jsonl:2: prompt \+ candidates\[1\] is 129 tokens, more than the model's context length 128",
        ),
    ],
)
def test_bad_eval_data_names_the_file_and_line(line, message, tiny_opt, tmp_path) -> None:
    from sglang.overlay.mezo.data import load_eval_examples

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(EVAL[1]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message):
        load_eval_examples(path, str(tiny_opt))


def test_n_spsa_and_the_linear_schedule_equal_the_hf_reference(tiny_opt) -> None:
    """q=2: two single-sample projected gradients at θ, averaged, on the HF reference; linear: lr·(1-k/T)."""
    import torch

    from sglang.overlay.mezo import MeZO, MeZOConfig
    from tests.support.mezo_reference import ReferenceMeZO, seed_for

    hyper = dict(lr=1e-4, eps=1e-2, seed=11)
    config = MeZOConfig(**hyper, n_samples=2, lr_schedule="linear", total_steps=3)
    reference = ReferenceMeZO(tiny_opt, **hyper)
    with runner(tiny_opt) as r:
        trainer = MeZO(r, config)
        results = trainer.train(BATCHES, 3, progress=False)
        trained = hf_state(trainer)
    with torch.no_grad():
        for k, result in enumerate(results):
            prompts, targets = BATCHES[k % 2]
            seeds = [seed_for(11, "step", k, "sample", i) for i in range(2)]
            grads, losses = [], []
            for seed in seeds:
                reference._perturb(seed, 1)
                plus = reference.loss(prompts, targets)
                reference._perturb(seed, -2)
                minus = reference.loss(prompts, targets)
                reference._perturb(seed, 1)
                grads.append((plus - minus) / (2 * hyper["eps"]))
                losses.append((plus + minus) / 2)
            lr = hyper["lr"] * (1 - k / 3)
            for seed, grad in zip(seeds, grads):
                for _, p, z in reference._z(seed):
                    p -= lr * grad / 2 * z
            assert (result.seed, result.lr) == (seeds[0], lr)
            assert abs(result.projected_grad - sum(grads) / 2) < TOL / hyper["eps"]
            assert abs(result.loss - sum(losses) / 2) < TOL
    expected = reference.state_dict()
    assert max((trained[k] - expected[k]).abs().max().item() for k in trained) < TOL
    with pytest.raises(ValueError, match="step 3 is past the linear schedule's total_steps 3"):
        config.lr_at(3)
    for fields, message in [
        (dict(n_samples=0), "n_samples must be an int >= 1"),
        (dict(lr_schedule="cosine"), "lr_schedule must be one of"),
        (dict(lr_schedule="linear"), "lr_schedule='linear' needs total_steps"),
    ]:
        with pytest.raises(ValueError, match=message):
            MeZOConfig(**fields).validate()


def mezo_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang.overlay.mezo", "--device", "cpu", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )


def test_command_line_checkpoints_resumes_and_evaluates(tiny_opt, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    from sglang.overlay.mezo.__main__ import main

    data, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in zip(PROMPTS, TARGETS)))
    dev.write_text("".join(json.dumps(e) + "\n" for e in EVAL))
    common = [
        "--model",
        str(tiny_opt),
        "--data",
        str(data),
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--eps",
        "1e-2",
        "--seed",
        "4",
        "--lora-rank",
        "2",
        "--n-samples",
        "2",
        "--save-every",
        "2",
        "--eval-data",
        str(dev),
        "--eval-every",
        "2",
    ]
    whole = mezo_cli(*common, "--steps", "4", "--out", str(tmp_path / "whole"), "--no-progress")
    assert whole.returncode == 0, whole.stderr[-3000:]  # a subprocess as the others: the same float math
    first = mezo_cli(*common, "--steps", "2", "--out", str(tmp_path / "parts"))
    assert first.returncode == 0, first.stderr[-3000:]
    with pytest.raises(
        SystemExit,
        match=r"^error: --out .* already holds checkpoints of a run \(step-000002\): "
        r"pass --resume",
    ):
        main([*common, "--steps", "4", "--out", str(tmp_path / "parts"), "--no-progress"])
    with pytest.raises(
        SystemExit,
        match=r"^error: cannot resume from .*step-000002: .*lr: checkpoint 0.01, "
        r"this run 0.02",
    ):
        main([*common, "--steps", "4", "--out", str(tmp_path / "parts"), "--resume", "--lr", "2e-2"])
    resumed = mezo_cli(*common, "--steps", "4", "--out", str(tmp_path / "parts"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "eval_nll=" in resumed.stderr and "eval_acc=" in resumed.stderr  # the progress bar's last eval
    for name in ("mezo_log.jsonl", "mezo_config.json"):
        assert (tmp_path / "parts" / name).read_text() == (tmp_path / "whole" / name).read_text()
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "parts" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["steps_done"] == 4 and state["run"]["batch_size"] == 2 and state["mezo_config"]["n_samples"] == 2
    assert (tmp_path / "parts" / "checkpoints" / "step-000004" / "mezo_lora.safetensors").is_file()
    evals = [
        x
        for x in map(json.loads, (tmp_path / "whole" / "mezo_log.jsonl").read_text().splitlines())
        if x["kind"] == "eval"
    ]
    assert [x["steps_done"] for x in evals] == [0, 2, 4] and all(0 <= x["accuracy"] <= 1 for x in evals)
