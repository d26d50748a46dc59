"""Mutations of the core that the suite must catch (the full row): each is applied to a copy of the sglang
package under test, and the named fast tests, run against the copy, must fail.

The mutations are the bugs a past audit found the suite blind to, and the core's most consequential lines:
an update of the wrong sign, z of the wrong offsets, a bias or LayerNorm routed to the wrong place, an input
check one off. Each names the file (in the sglang package, as installed), the exact text it replaces (the
list is stale, and this test says so, when that text is not there once), and the tests that catch it. A small
script rather than a mutation tool (mutmut and its kind mutate a source tree in place and run one test
command): the package under test is the patched release's, and each mutation needs only its own tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


class Mutation(NamedTuple):
    name: str
    file: str  # relative to the sglang package
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail (one failing is enough)


MUTATIONS = [
    Mutation(
        "update sign",
        "overlay/mezo/trainer.py",
        "return Stream(seed, self.config.eps, -lr * projected_grad)",
        "return Stream(seed, self.config.eps, lr * projected_grad)",
        ("tests/test_mezo.py::test_full_training_equals_the_hf_reference[pre_ln]",),
    ),
    Mutation(
        "z repeating every 2 offsets",
        "overlay/mezo/noise.py",
        "return z.gather(-1, (offsets & 3).unsqueeze(-1)).squeeze(-1)",
        "return z.gather(-1, (offsets & 2).unsqueeze(-1)).squeeze(-1)",
        ("tests/test_zo_noise.py::test_z_is_normal_with_no_short_period_and_no_lag_correlation",),
    ),
    Mutation(
        "z offset of a column shard (tensor parallelism)",
        "overlay/mezo/params.py",
        "first = base + self.R0 * self.hf_cols + self.C0",
        "first = base + self.R0 * self.hf_cols",
        ("tests/test_families_mezo.py::test_tensor_parallel_gqa_llama_equals_one_rank[2]",),
    ),
    Mutation(
        "q and k bias shards swapped in OPT's loader",
        "srt/models/opt.py",
        '".q_proj.": (".qkv_proj.", "q"),\n    ".k_proj.": (".qkv_proj.", "k"),',
        '".q_proj.": (".qkv_proj.", "k"),\n    ".k_proj.": (".qkv_proj.", "q"),',
        ("tests/test_opt.py::test_logits_match_hf_at_every_position_and_after_decode[pre_ln]",),
    ),
    Mutation(
        "the two LayerNorms of a layer swapped",
        "srt/models/opt.py",
        "hidden_states, residual = self.final_layer_norm(hidden_states, residual)",
        "hidden_states, residual = self.self_attn_layer_norm(hidden_states, residual)",
        ("tests/test_opt.py::test_logits_match_hf_at_every_position_and_after_decode[pre_ln]",),
    ),
    Mutation(
        "OPT's decoder.* names not remapped",
        "srt/models/opt.py",
        'return "model." + name if name.startswith("decoder.") else name',
        "return name",
        ("tests/test_opt.py::test_logits_match_hf_at_every_position_and_after_decode[decoder_names]",),
    ),
    Mutation(
        "reuse comparing only the tensor and pipeline widths",
        "srt/distributed/reuse.py",
        "        for name, value in requested.items()\n        if _resolved(name, _GROUP_ARGS.get(name)) != _resolved(name, value)",
        "        for name, value in requested.items()\n"
        '        if name in ("tensor_model_parallel_size", "pipeline_model_parallel_size")\n'
        "        and _resolved(name, _GROUP_ARGS.get(name)) != _resolved(name, value)",
        ("tests/test_reuse_distributed.py::test_mismatches_raise_value_error_naming_both_values",),
    ),
    Mutation(
        "reuse not comparing the rank",
        "srt/distributed/reuse.py",
        "        elif name in existing:\n",
        '        elif name in existing and name != "rank":\n',
        ("tests/test_reuse_distributed.py::test_mismatches_raise_value_error_naming_both_values",),
    ),
    Mutation(
        "the context check one off",
        "overlay/inputs.py",
        "if length > limits.context_len:",
        "if length >= limits.context_len:",
        ("tests/test_runner_inputs.py::test_the_limits_themselves_are_valid_input",),
    ),
    Mutation(
        "the token id check one off",
        "overlay/inputs.py",
        "if not 0 <= token < limits.vocab_size:",
        "if not 0 <= token <= limits.vocab_size:",
        ("tests/test_runner_inputs.py::test_bad_input_is_a_value_error_naming_it",),
    ),
    Mutation(
        "candidates scored by their mean log-likelihood",
        "overlay/mezo/eval.py",
        "totals += [row.double().sum().item() for row in logprobs]",
        "totals += [row.double().mean().item() for row in logprobs]",
        ("tests/test_mezo_runs.py::test_accuracy_takes_the_candidate_of_highest_total_not_mean_log_likelihood",),
    ),
    Mutation(
        "a pending update served to the runner's callers",
        "overlay/runner.py",
        "        for sync in self._weight_syncs:\n            sync()",
        "        pass",
        ("tests/test_mezo.py::test_the_runner_never_serves_a_pending_update",),
    ),
]


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the sglang package under test (hard links), first on the mutated runs' path."""
    import sglang

    root = tmp_path_factory.mktemp("mutant")
    try:
        shutil.copytree(Path(sglang.__file__).parent, root / "sglang", copy_function=os.link)
    except OSError:
        shutil.copytree(Path(sglang.__file__).parent, root / "sglang")
    return root


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_the_named_tests_catch_the_mutation(mutation: Mutation, package_copy: Path) -> None:
    target = package_copy / "sglang" / mutation.file
    original = target.read_text()
    assert original.count(mutation.old) == 1, (
        f"{mutation.file} no longer holds the text this mutation replaces once: update MUTATIONS in "
        f"tests/test_mutations.py ({mutation.name})"
    )
    target.unlink()  # a hard link: write a file of its own
    target.write_text(original.replace(mutation.old, mutation.new))
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_copy), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        target.unlink()
        target.write_text(original)
    tail = proc.stdout[-3000:]
    # pytest exits 1 when a test failed (2: interrupted, 4: usage, 5: nothing collected: not a catch)
    assert proc.returncode == 1 and " failed" in tail, f"the mutation '{mutation.name}' survived:\n{tail}"
