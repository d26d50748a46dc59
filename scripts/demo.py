"""The overlay's main job in one screen: SGLang's native OPT in-process, against HuggingFace.

Builds a tiny random OPT checkpoint (no model hub needed), a ModelRunner on it
through ``sglang.overlay`` (CPU, fp32), scores a batch of unequal
lengths, and prints the logits next to HuggingFace OPTForCausalLM's on the
same weights. Then builds a second runner in the same process
(SGLANG_ALLOW_REUSE_DISTRIBUTED) and checks it agrees.

Run it with a patched venv's python: ``python3 scripts/overlay.py demo``. Upstream's messages
that no step explains are dropped (``sglang.overlay.quiet``); ``--verbose`` shows them.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from transformers import OPTConfig, OPTForCausalLM

import sglang.overlay
from sglang.overlay import RunnerConfig, StandaloneRunner, quiet

LOG_LEVEL = "verbose" if "--verbose" in sys.argv[1:] else "quiet"
with quiet.scope(LOG_LEVEL):  # the registry's import warnings and error list (quiet.NOISE)
    from sglang.srt.models.registry import ModelRegistry

SEQS = [[2, 100, 200, 300, 400, 11, 7], [2, 5, 6], [2, 42, 43, 44, 45]]


def main() -> None:
    print(sglang.overlay.describe())
    with tempfile.TemporaryDirectory(prefix="sglang-overlay-demo-") as tmp:
        torch.manual_seed(0)
        config = OPTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            vocab_size=512,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        )
        hf = OPTForCausalLM(config).eval()
        with quiet.scope(LOG_LEVEL):
            hf.save_pretrained(tmp)
        model_cls, arch = ModelRegistry.resolve_model_cls(["OPTForCausalLM"])
        print(f"registry: {arch} -> {model_cls.__module__}.{model_cls.__name__}")

        tic = time.perf_counter()
        first = StandaloneRunner(RunnerConfig(model_path=tmp, device="cpu", log_level=LOG_LEVEL))
        print(
            f"ModelRunner built in {time.perf_counter() - tic:.2f} s: "
            f"{type(first.model).__module__}.{type(first.model).__name__}"
        )
        logits = first.logits(SEQS)
        with torch.no_grad():
            reference = [hf(torch.tensor([s])).logits[0] for s in SEQS]

        print("\nseq  pos  sglang top-3 logits            HF top-3 logits                max|diff|")
        for i, (ours, theirs) in enumerate(zip(logits, reference)):
            for pos in (0, len(SEQS[i]) - 1):
                top = theirs[pos].topk(3).indices
                print(
                    f"{i:3d}  {pos:3d}  {fmt(ours[pos], top)}  {fmt(theirs[pos], top)}  "
                    f"{(ours[pos] - theirs[pos]).abs().max().item():.2e}"
                )
        worst = max((a - b).abs().max().item() for a, b in zip(logits, reference))
        print(f"\nmax |sglang - HF| over every position of the batch: {worst:.2e}")

        tic = time.perf_counter()
        second = StandaloneRunner(RunnerConfig(model_path=tmp, device="cpu", distributed="reuse", log_level=LOG_LEVEL))
        same = all(torch.equal(a, b) for a, b in zip(logits, second.logits(SEQS)))
        print(
            f"second runner in this process (distributed='reuse') built in {time.perf_counter() - tic:.2f} s; "
            f"identical logits: {same}"
        )
        second.close()
        first.close()
        if worst > 1e-5 or not same:
            raise SystemExit("the native OPT does not match HuggingFace")


def fmt(row: torch.Tensor, index: torch.Tensor) -> str:
    return " ".join(f"{int(i):3d}:{row[i].item():+.4f}" for i in index)


if __name__ == "__main__":
    main()
