"""One rank of a two-rank pipeline (PP=2, gloo) that loads the native OPT from a whole HF checkpoint.

    python -m tests.support.opt_pp MODEL_DIR --rank R --port P

Prints ``RESULT <json>``: this rank's layer range, whether every parameter equals HF's tensor (fused
q/k/v from its shards), whether a checkpoint without a tensor of the other rank's layer loads, and the
tensor a checkpoint without one of this rank's layers is refused for.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from unittest import mock

import torch

from tests.support import checkpoints
from tests.support.reuse_scenarios import _request


def _matches_hf(model, state) -> bool:
    for name, param in model.named_parameters():
        if ".qkv_proj." in name:
            expected = torch.cat([state[name.replace(".qkv_proj.", f".{p}_proj.")] for p in "qkv"])
        else:
            expected = state[name]
        if not torch.equal(param.data, expected):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    from transformers import OPTConfig

    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.models.opt import OPTForCausalLM

    ps.init_distributed_environment(
        world_size=2,
        rank=args.rank,
        local_rank=args.rank,
        backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{args.port}",
    )
    _request(args.model, args.rank, tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    config = OPTConfig.from_pretrained(args.model)
    state = checkpoints.read_state_dict(args.model)

    def build():
        # The logits processor and pooler are not under test and read server config.
        with mock.patch("sglang.srt.models.opt.LogitsProcessor"), mock.patch("sglang.srt.models.opt.Pooler"):
            return OPTForCausalLM(config)

    model = build()
    model.load_weights(state.items())
    other = f"model.decoder.layers.{1 - args.rank}.fc2.bias"
    build().load_weights((n, w) for n, w in state.items() if n != other)
    own = f"model.decoder.layers.{args.rank}.fc2.bias"
    refused = None
    try:
        build().load_weights((n, w) for n, w in state.items() if n != own)
    except ValueError as e:
        refused = re.findall(r"'(model\.decoder\.layers\.\d+\.[\w.]+)'", str(e))
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()
    result = {
        "layers": [model.start_layer, model.end_layer],
        "matches_hf": _matches_hf(model, state),
        "other_layer_missing_ok": True,
        "own_layer_missing": refused[0] if refused and len(refused) == 1 else refused,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
