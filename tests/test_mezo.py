"""sglang/overlay/mezo/trainer.py: MeZO on the in-process runner equals an independent HF MeZO.

The reference (tests/support/mezo_reference.py) trains HF ``OPTForCausalLM`` on
CPU in fp32 from the same seeds. Step sizes are chosen so that the weights move
by ~1e-2 in 20 steps while the two runs agree to 1e-5: the projected gradient
amplifies loss rounding by 1/(2·eps), hence eps = 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.mezo import PROMPTS, STEPS, TARGETS, TOL, load_saved, max_weight_diff

pytestmark = pytest.mark.sglang

FULL_VARIANTS = {
    "pre_ln": (dict(), dict(lr=1e-4, eps=1e-2, seed=5)),
    "post_ln_project_in_out_untied_padded_vocab": (
        dict(do_layer_norm_before=False, word_embed_proj_dim=32, tie_word_embeddings=False, vocab_size=500),
        dict(lr=3e-4, eps=1e-2, seed=6, weight_decay=0.5, z_rounds=7),
    ),
}


def train_both(runner, model_dir: Path, hyper: dict, out_dir: Path):
    from sglang.overlay.mezo import MeZO, MeZOConfig
    from tests.support.mezo_reference import ReferenceMeZO, seed_for

    trainer = MeZO(runner, MeZOConfig(**hyper))
    reference = ReferenceMeZO(model_dir, **hyper)
    results = trainer.train([(PROMPTS, TARGETS)], STEPS, progress=False)
    trainer.max_loss_diff = 0.0
    for k, result in enumerate(results):
        plus, minus = reference.step(PROMPTS, TARGETS)
        trainer.max_loss_diff = max(trainer.max_loss_diff, abs(result.loss_plus - plus), abs(result.loss_minus - minus))
        assert (result.step, result.seed) == (k, seed_for(hyper["seed"], "step", k))
        assert abs(result.loss_plus - plus) < TOL and abs(result.loss_minus - minus) < TOL, (k, result, plus, minus)
        assert result.projected_grad == (result.loss_plus - result.loss_minus) / (2 * hyper["eps"])
        assert result.loss == (result.loss_plus + result.loss_minus) / 2
    trainer.save_pretrained(out_dir)
    return trainer, reference, load_saved(out_dir).state_dict()


@pytest.mark.parametrize("variant", list(FULL_VARIANTS))
def test_full_training_equals_the_hf_reference(variant: str, build, tmp_path: Path) -> None:
    from tests.support.runtime import make_tiny_opt

    overrides, hyper = FULL_VARIANTS[variant]
    model_dir = make_tiny_opt(tmp_path / "model", seed=3, **overrides)
    initial = load_saved(model_dir).state_dict()
    trainer, reference, trained = train_both(build(model_dir), model_dir, hyper, tmp_path / "out")
    print(
        f"MEZO_VS_HF {variant}: max |dL+-| {trainer.max_loss_diff:.1e}, max |dW| "
        f"{max_weight_diff(trained, reference.state_dict()):.1e}, largest move {max_weight_diff(trained, initial):.1e}"
    )
    assert max_weight_diff(trained, reference.state_dict()) < TOL
    assert max_weight_diff(trained, initial) > 1e-3, "20 steps must move the weights"


def test_lora_training_equals_the_hf_reference_and_leaves_base_weights(build, tiny_opt: Path, tmp_path: Path) -> None:
    import torch

    from sglang.overlay.mezo import MeZO

    runner = build(tiny_opt)
    base = {name: p.detach().clone() for name, p in runner.model.named_parameters()}
    hyper = dict(lr=1e-2, eps=1e-2, seed=7, lora_rank=4, lora_alpha=8.0)
    trainer, reference, trained = train_both(runner, tiny_opt, hyper, tmp_path / "out")
    assert all(torch.equal(p, base[name]) for name, p in runner.model.named_parameters())
    assert list(trainer.trainables) == [
        f"model.decoder.layers.{i}.self_attn.{t}_proj.lora_{m}.weight" for i in range(2) for t in "qv" for m in "AB"
    ]
    initial = load_saved(tiny_opt).state_dict()
    print(
        f"MEZO_VS_HF lora: max |dL+-| {trainer.max_loss_diff:.1e}, max |dW| "
        f"{max_weight_diff(trained, reference.state_dict()):.1e}, largest move {max_weight_diff(trained, initial):.1e}"
    )
    assert max_weight_diff(trained, reference.state_dict()) < TOL
    changed = {k for k in initial if not torch.equal(trained[k], initial[k])}
    assert changed == {f"model.decoder.layers.{i}.self_attn.{t}_proj.weight" for i in range(2) for t in "qv"}
    assert max_weight_diff(trained, initial) > 1e-3
    with pytest.raises(ValueError, match="already carries another MeZO trainer's LoRA hooks"):
        MeZO(runner, trainer.config)


def test_scoring_after_an_in_place_perturbation_sees_only_the_new_weights(
    build, tiny_opt: Path, tmp_path: Path
) -> None:
    """No K/V of the old weights is read: the runner tracks HF on the perturbed weights.

    (Claims that RadixAttention reuses most of the KV across MeZO's perturbation
    passes are false: this path has no radix cache and clears the pools per call.)
    """
    import torch

    from sglang.overlay.mezo import MeZO, MeZOConfig

    runner = build(tiny_opt)
    assert runner.server_args.disable_radix_cache
    trainer = MeZO(runner, MeZOConfig(eps=1e-2))
    hf_before = load_saved(tiny_opt)
    seqs = [p + t for p, t in zip(PROMPTS, TARGETS)]
    before = runner.loss(PROMPTS, TARGETS).item()
    trainer.perturb(seed=11, scale=1.0)
    after = runner.loss(PROMPTS, TARGETS).item()
    hf_after = load_saved(trainer.save_pretrained(tmp_path / "perturbed"))
    with torch.no_grad():
        for seq, logits in zip(seqs, runner.logits(seqs)):
            assert (logits - hf_after(torch.tensor([seq])).logits[0]).abs().max().item() < TOL
    hf_delta = hf_loss(hf_after) - hf_loss(hf_before)
    assert abs(after - before) > 1e-3
    assert abs((after - before) - hf_delta) < TOL, (after - before, hf_delta)
    trainer.perturb(seed=11, scale=-1.0)
    assert abs(runner.loss(PROMPTS, TARGETS).item() - before) < TOL


def hf_loss(model) -> float:
    import torch

    nll = []
    with torch.no_grad():
        for prompt, target in zip(PROMPTS, TARGETS):
            logp = torch.log_softmax(model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1], dim=-1)
            nll.append(-logp.gather(-1, torch.tensor(target)[:, None])[:, 0])
    return torch.cat(nll).mean().item()


def test_the_runner_never_serves_a_pending_update(build, tiny_opt: Path, tmp_path: Path) -> None:
    """train() leaves its last step's update deferred (the next step's first pass applies it). Whatever reads
    the runner meanwhile sees θ: its logits between two train calls equal a fresh runner's on save_pretrained's
    output, and training on afterwards takes the same steps as a trainer that never paused."""
    from sglang.overlay import RunnerConfig, StandaloneRunner
    from sglang.overlay.mezo import MeZO, MeZOConfig

    seqs = [p + t for p, t in zip(PROMPTS, TARGETS)]
    config = MeZOConfig(lr=1e-4, eps=1e-2, seed=5)
    runner = build(tiny_opt)
    trainer = MeZO(runner, config)
    first = trainer.train([(PROMPTS, TARGETS)], 2, progress=False)
    assert trainer._pending is not None, "the case under test: an update is deferred"
    got = runner.logits(seqs)
    trainer.save_pretrained(tmp_path / "hf")
    rest = trainer.train([(PROMPTS, TARGETS)], 2, progress=False)
    runner.close()
    with StandaloneRunner(RunnerConfig(model_path=str(tmp_path / "hf"), device="cpu")) as fresh:
        want = fresh.logits(seqs)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-6
    with StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu")) as again:
        straight = MeZO(again, config).train([(PROMPTS, TARGETS)], 4, progress=False)
    for paused, unpaused in zip(first + rest, straight):  # (the sync rounds once more than a folded pass)
        assert abs(paused.loss_plus - unpaused.loss_plus) < TOL and abs(paused.loss_minus - unpaused.loss_minus) < TOL


def test_the_same_seed_gives_identical_weights(build, tiny_opt: Path) -> None:
    import torch

    from sglang.overlay.mezo import MeZO, MeZOConfig

    runs = []
    for _ in range(2):
        runner = build(tiny_opt)
        trainer = MeZO(runner, MeZOConfig(lr=1e-4, eps=1e-2, seed=9))
        runs.append(
            (
                trainer.train([(PROMPTS, TARGETS), (PROMPTS[:1], TARGETS[:1])], 3, progress=False),
                trainer.hf_state_dict(),
            )
        )
        runner.close()
    (results_a, weights_a), (results_b, weights_b) = runs
    assert results_a == results_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_unmapped_or_mismatched_parameters_are_refused(build, tiny_opt: Path) -> None:
    import torch
    from transformers import AutoConfig

    from sglang.overlay.mezo.params import hf_parameter_views

    runner = build(tiny_opt)
    config = AutoConfig.from_pretrained(tiny_opt)
    assert len(hf_parameter_views(runner.model, config)) == 2 + 16 * 2 + 2
    with pytest.raises(
        ValueError,
        match=r"HF parameter 'model.decoder.layers.0.fc1.weight': the model's load_weights failed to place it among "
        r"layer 0's parameters \(.*\(96, 64\)",
    ):
        hf_parameter_views(runner.model, AutoConfig.from_pretrained(tiny_opt, ffn_dim=96))
    runner.model.register_parameter("adapter", torch.nn.Parameter(torch.zeros(3)))
    try:
        with pytest.raises(
            ValueError, match=r"SGLang parameter 'adapter' \(3,\): HF parameters cover 0 of its 3 elements"
        ):
            hf_parameter_views(runner.model, config)
    finally:
        del runner.model.adapter


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(eps=float("nan")), "eps must be a finite number > 0"),
        (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
        (dict(seed=-1), "seed must be an int >= 0"),
        (dict(lora_rank=0), "lora_rank must be an int >= 1, or None"),
        (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha must be a finite number > 0"),
        (dict(lora_targets=("o_proj",)), "lora_targets must be distinct names among"),
        (dict(lora_targets=()), "lora_targets must be distinct names among"),
        (dict(z_rounds=6), r"z_rounds must be an int >= 7 and <= 10, got 6"),
    ],
)
def test_invalid_configs_say_what_is_wrong(fields: dict, message: str) -> None:
    from sglang.overlay.mezo import MeZOConfig

    MeZOConfig().validate()
    with pytest.raises(ValueError, match=message):
        MeZOConfig(**fields).validate()


def test_pipeline_parallel_and_lora_under_tensor_parallel_are_refused() -> None:
    from sglang.overlay.mezo import MeZO, MeZOConfig

    runner = SimpleNamespace(
        server_args=SimpleNamespace(tp_size=1, pp_size=2), config=SimpleNamespace(tp_rank=0, tp_size=1)
    )
    with pytest.raises(ValueError, match="pipeline-parallel size 1 only, the runner has 2"):
        MeZO(runner, MeZOConfig())
    runner = SimpleNamespace(
        server_args=SimpleNamespace(tp_size=2, pp_size=1), config=SimpleNamespace(tp_rank=0, tp_size=2)
    )
    with pytest.raises(ValueError, match="LoRA with tensor parallelism is not supported"):
        MeZO(runner, MeZOConfig(lora_rank=2))


def test_command_line_trains_and_saves_a_checkpoint(tiny_opt: Path, tmp_path: Path, capsys) -> None:
    from sglang.overlay.mezo.__main__ import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in zip(PROMPTS, TARGETS)))
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                str(tiny_opt),
                "--data",
                str(data),
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--lr",
                "1e-4",
                "--eps",
                "1e-2",
                "--seed",
                "1",
                "--lora-rank",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "loss=" in capsys.readouterr().err
    log = [json.loads(line) for line in (out / "mezo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert json.loads((out / "mezo_config.json").read_text())["lora_rank"] == 2
    load_saved(out)


def test_folded_updates_equal_unfolded_steps(build, tiny_opt: Path) -> None:
    """train() folds each update into the next step's first perturbation (2 weight passes a step);
    step() without defer_update restores and updates in a pass of its own (3): after 20 steps the
    weights and losses agree (fp32: the folded pass rounds once where the unfolded rounds twice)."""
    from sglang.overlay import RunnerConfig, StandaloneRunner
    from sglang.overlay.mezo import MeZO, MeZOConfig

    hyper = MeZOConfig(lr=1e-4, eps=1e-2, seed=5, weight_decay=0.5)
    folded_runner = build(tiny_opt)

    with StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu", distributed="reuse")) as plain_runner:
        folded, plain = MeZO(folded_runner, hyper), MeZO(plain_runner, hyper)
        initial = {k: v.clone() for k, v in plain.weights.items()}
        calls = []
        original = folded.noise.__call__
        folded.noise = lambda streams, keep=1.0: (calls.append(len(streams)), original(streams, keep))[1]
        got = folded.train([(PROMPTS, TARGETS)], STEPS, progress=False)
        want = [plain.step(PROMPTS, TARGETS) for _ in range(STEPS)]
        assert len(calls) == 2 * STEPS, "2 passes a step, the last update still deferred"
        assert calls.count(2) == STEPS - 1, "every step after the first folds the previous update"
        for a, b in zip(got, want):
            assert abs(a.loss_plus - b.loss_plus) < TOL and abs(a.loss_minus - b.loss_minus) < TOL
        diff = max((folded.weights[k] - plain.weights[k]).abs().max().item() for k in folded.weights)
        moved = max((plain.weights[k] - initial[k]).abs().max().item() for k in plain.weights)
        assert diff < 1e-6 < moved, diff
