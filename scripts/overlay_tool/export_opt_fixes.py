"""The OPT fixes of ``export-pr``: upstream's own ``srt/models/opt.py`` at the base tag, with its
defects fixed and strict weight loading, as the smallest diff (every other line of upstream's file,
its newer APIs included, stays as the tag has it).

Each fix is a list of exact edits (old text, new text, how often the old text must occur). A fix
whose old text is not in the tag's file raises OverlayError naming it: upstream changed the code
there, so the fix needs a new edit (or upstream fixed it: then drop it here). The fused
add + LayerNorm op and the other speed work of this repository's opt.py are not fixes and are not
exported.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import OverlayError

OPT_PATH = "python/sglang/srt/models/opt.py"


@dataclass(frozen=True)
class Fix:
    what: str  # one line, for the PR description
    edits: tuple[tuple[str, str, int], ...]


FIXES: tuple[Fix, ...] = (
    Fix(
        "`get_activation` returned `nn.Identity()` for an unknown activation (a silently wrong model); it raises `ValueError` now",
        (
            (
                '    if name == "sigmoid":\n        return torch.nn.Sigmoid()\n    return nn.Identity()\n',
                '    if name == "sigmoid":\n        return torch.nn.Sigmoid()\n    raise ValueError(f"Unsupported OPT activation function: {name!r}")\n',
                1,
            ),
        ),
    ),
    Fix(
        "the decoder layers got the prefix `model.layers` instead of `model.decoder.layers` (their quantization and layer-id names)",
        (('            prefix="model.layers",\n', '            prefix=add_prefix("layers", prefix),\n', 1),),
    ),
    Fix(
        "`load_kv_cache_scales` used `layer_self_attn` unbound (or of the previous layer) for a layer of another pipeline rank; it skips those layers",
        (
            (
                "            if not isinstance(self.decoder.layers[layer_idx], nn.Identity):\n                layer_self_attn = self.decoder.layers[layer_idx].self_attn\n",
                "            if isinstance(self.decoder.layers[layer_idx], nn.Identity):\n                continue\n            layer_self_attn = self.decoder.layers[layer_idx].self_attn\n",
                1,
            ),
        ),
    ),
    Fix(
        "`load_weights` skipped unknown checkpoint tensors silently and never noticed missing ones; an unexpected tensor or (on the first call, the checkpoint load) a missing one raises `ValueError` naming it, and a tied `lm_head.weight` is ignored as transformers does",
        (
            (
                '            ("qkv_proj", "v_proj", "v"),\n        ]\n        params_dict = dict(self.named_parameters(remove_duplicate=False))\n\n        for name, loaded_weight in weights:\n            if name.startswith("decoder"):\n                name = name.replace("decoder.", "model.decoder.")\n',
                '            ("qkv_proj", "v_proj", "v"),\n        ]\n        params_dict = dict(self.named_parameters(remove_duplicate=False))\n        loaded_params = set()\n\n        for name, loaded_weight in weights:\n            if name.startswith("decoder"):\n                name = name.replace("decoder.", "model.decoder.")\n            if name == "lm_head.weight" and self.config.tie_word_embeddings:\n                continue\n',
                1,
            ),
            (
                "                param = params_dict[name]\n                weight_loader = param.weight_loader\n                weight_loader(param, loaded_weight, shard_id)\n                break\n",
                "                param = params_dict[name]\n                weight_loader = param.weight_loader\n                weight_loader(param, loaded_weight, shard_id)\n                loaded_params.add(name)\n                break\n",
                1,
            ),
            (
                '                if name not in params_dict:\n                    continue\n                if name in params_dict.keys():\n                    param = params_dict[name]\n                    weight_loader = getattr(\n                        param, "weight_loader", default_weight_loader\n                    )\n                    weight_loader(param, loaded_weight)\n                else:\n                    logger.warning(f"Parameter {name} not found in params_dict")\n',
                '                if name not in params_dict:\n                    raise ValueError(\n                        f"Unexpected weight {name!r}: OPTForCausalLM has no such parameter"\n                    )\n                param = params_dict[name]\n                weight_loader = getattr(param, "weight_loader", default_weight_loader)\n                weight_loader(param, loaded_weight)\n                loaded_params.add(name)\n\n        if not self.checkpoint_loaded:\n            # The first call loads the whole checkpoint; later calls may update\n            # any subset of the weights.\n            missing = [\n                name\n                for name in dict(self.named_parameters())\n                if name not in loaded_params\n                and (\n                    get_layer_id(name) is None\n                    or self.start_layer <= get_layer_id(name) < self.end_layer\n                )\n            ]\n            if missing:\n                raise ValueError(f"OPT checkpoint lacks weights for {missing}")\n            self.checkpoint_loaded = True\n',
                1,
            ),
            (
                "        self.capture_aux_hidden_states = False\n",
                "        self.capture_aux_hidden_states = False\n        self.checkpoint_loaded = False\n",
                1,
            ),
        ),
    ),
    Fix(
        "`get_module_name_from_weight_name` unpacked 4-tuples from the 3-tuples of `stacked_params_mapping` (`ValueError` for every q/k/v name)",
        (
            (
                '        for param_name, weight_name, shard_id, num_shard in self.stacked_params_mapping:\n            if weight_name in name:\n                return (\n                    name.replace(weight_name, param_name)[: -len(".weight")],\n                    num_shard,\n                )\n',
                '        for param_name, weight_name, _ in self.stacked_params_mapping:\n            if weight_name in name:\n                return (\n                    name.replace(weight_name, param_name)[: -len(".weight")],\n                    len(self.stacked_params_mapping),\n                )\n',
                1,
            ),
        ),
    ),
    Fix(
        "`get_input_embeddings`, `get_embed`, `set_embed`, `get_embed_and_head`, `set_embed_and_head` and `get_weights_by_name` read `self.model.embed_tokens`, which lives at `self.model.decoder.embed_tokens` (`AttributeError`)",
        (("self.model.embed_tokens", "self.model.decoder.embed_tokens", 8),),
    ),
    Fix(
        "the `start_layer` / `end_layer` properties read `self.model.start_layer`, which lives on `self.model.decoder` (`AttributeError`)",
        (
            ("return self.model.start_layer", "return self.model.decoder.start_layer", 1),
            ("return self.model.end_layer", "return self.model.decoder.end_layer", 1),
        ),
    ),
)


def fixed_opt(text: str, tag: str) -> str:
    """Upstream's opt.py ``text`` (at ``tag``) with every fix applied."""
    for fix in FIXES:
        for old, new, count in fix.edits:
            found = text.count(old)
            if found != count:
                first = old.strip().splitlines()[0]
                raise OverlayError(
                    f"{OPT_PATH} at {tag} has {found} occurrence(s) of the code the fix "
                    f"'{fix.what[:60]}...' edits ({first!r}), not {count}: upstream changed it there. "
                    "Update that fix's edits in scripts/overlay_tool/export_opt_fixes.py for this file "
                    "(or drop the fix if upstream fixed it), then run again"
                )
            text = text.replace(old, new)
    return text
