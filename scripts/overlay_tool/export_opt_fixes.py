"""The OPT changes of ``export-pr``: upstream's own ``srt/models/opt.py`` at the base tag with its
defects fixed (FIXES, the ``opt-fixes`` branch), then strict weight loading (STRICT, the
``opt-strict-loading`` branch, on top of it), each as the smallest diff (every other line of
upstream's file, its newer APIs included, stays as the tag has it).

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
        "`get_activation` returned `nn.Identity()` for an unknown activation (a silently wrong model; its "
        'docstring listed "swish", which it never supported); it raises `ValueError` now',
        (
            (
                '            one of ["relu", "gelu", "swish", "sigmoid"],\n            default "relu".\n    """\n',
                '            one of ["relu", "gelu", "sigmoid"],\n            default "relu".\n\n'
                '    Raises:\n        ValueError: for any other name.\n    """\n',
                1,
            ),
            (
                '    if name == "sigmoid":\n        return torch.nn.Sigmoid()\n    return nn.Identity()\n',
                '    if name == "sigmoid":\n        return torch.nn.Sigmoid()\n'
                '    raise ValueError(f"Unsupported OPT activation function: {name!r}")\n',
                1,
            ),
        ),
    ),
    Fix(
        "the decoder layers got the prefix `model.layers` instead of `model.decoder.layers` (their "
        "quantization and layer-id names)",
        (('            prefix="model.layers",\n', '            prefix=add_prefix("layers", prefix),\n', 1),),
    ),
    Fix(
        "`out_proj` was registered under the prefix `...self_attn.o_proj`, a name OPT checkpoints do not "
        "have (quantization configs match it)",
        (
            (
                '            prefix=add_prefix("o_proj", prefix),\n',
                '            prefix=add_prefix("out_proj", prefix),\n',
                1,
            ),
        ),
    ),
    Fix(
        "`load_kv_cache_scales` used `layer_self_attn` unbound (or of the previous layer) for a layer of "
        "another pipeline rank; it skips those layers",
        (
            (
                "            if not isinstance(self.decoder.layers[layer_idx], nn.Identity):\n"
                "                layer_self_attn = self.decoder.layers[layer_idx].self_attn\n",
                "            if isinstance(self.decoder.layers[layer_idx], nn.Identity):\n"
                "                continue\n"
                "            layer_self_attn = self.decoder.layers[layer_idx].self_attn\n",
                1,
            ),
        ),
    ),
    Fix(
        "`get_input_embeddings`, `get_embed`, `set_embed`, `get_embed_and_head`, `set_embed_and_head` and "
        "`get_weights_by_name` read `self.model.embed_tokens`, which lives at "
        "`self.model.decoder.embed_tokens` (`AttributeError`)",
        (("self.model.embed_tokens", "self.model.decoder.embed_tokens", 8),),
    ),
    Fix(
        "the `start_layer` / `end_layer` properties read `self.model.start_layer`, which lives on "
        "`self.model.decoder` (`AttributeError`)",
        (
            ("return self.model.start_layer", "return self.model.decoder.start_layer", 1),
            ("return self.model.end_layer", "return self.model.decoder.end_layer", 1),
        ),
    ),
    Fix(
        "`load_weights` skipped the layers of other pipeline ranks only `if hasattr(self.model, "
        '"start_layer")`, which is never true, so a pipeline rank hit `KeyError` on the first tensor of '
        "another rank's layer; it uses `start_layer` / `end_layer`",
        (
            (
                "            if (\n                layer_id is not None\n"
                '                and hasattr(self.model, "start_layer")\n'
                "                and (\n                    layer_id < self.model.start_layer\n"
                "                    or layer_id >= self.model.end_layer\n                )\n            ):\n",
                "            if layer_id is not None and not (\n"
                "                self.start_layer <= layer_id < self.end_layer\n            ):\n",
                1,
            ),
        ),
    ),
)

# Strict weight loading, its own PR on top of FIXES (it relies on their start_layer / end_layer).
STRICT: tuple[Fix, ...] = (
    Fix(
        "`load_weights` skipped a checkpoint tensor that no parameter takes with a warning at most (a "
        "misnamed checkpoint loads as a half-random model); it raises `ValueError` naming it (the extra "
        "biases of GPTQ checkpoints are still skipped)",
        (
            (
                "        params_dict = dict(self.named_parameters(remove_duplicate=False))\n\n"
                "        for name, loaded_weight in weights:\n",
                "        params_dict = dict(self.named_parameters(remove_duplicate=False))\n"
                "        loaded_params = set()\n\n"
                "        for name, loaded_weight in weights:\n",
                1,
            ),
            (
                "                weight_loader(param, loaded_weight, shard_id)\n                break\n",
                "                weight_loader(param, loaded_weight, shard_id)\n"
                "                loaded_params.add(name)\n                break\n",
                1,
            ),
            (
                "                if name not in params_dict:\n                    continue\n"
                "                if name in params_dict.keys():\n"
                "                    param = params_dict[name]\n"
                "                    weight_loader = getattr(\n"
                '                        param, "weight_loader", default_weight_loader\n'
                "                    )\n"
                "                    weight_loader(param, loaded_weight)\n"
                "                else:\n"
                '                    logger.warning(f"Parameter {name} not found in params_dict")\n',
                "                if name not in params_dict:\n"
                "                    raise ValueError(\n"
                '                        f"Unexpected weight {name!r}: OPTForCausalLM has no such parameter"\n'
                "                    )\n"
                "                param = params_dict[name]\n"
                '                weight_loader = getattr(param, "weight_loader", default_weight_loader)\n'
                "                weight_loader(param, loaded_weight)\n"
                "                loaded_params.add(name)\n",
                1,
            ),
        ),
    ),
    Fix(
        "`load_weights` never noticed a parameter the checkpoint lacks (it kept its random initial values); "
        "the first call, the checkpoint load, raises `ValueError` naming every parameter of this pipeline "
        "rank it left unset, except those a quantization method marks `_skip_weight_check` (the scales of "
        "online fp8 KV caches). Once every weight is initialized (that call, or `post_load_weights()`, "
        'which the loaders that bypass `load_weights` call, e.g. `load_format="dummy"`), later calls update '
        "any subset (`update_weights_from_tensor`)",
        (
            (
                "                loaded_params.add(name)\n\n    @property\n    def start_layer(self):\n",
                "                loaded_params.add(name)\n\n"
                "        if not self.weights_initialized:\n"
                "            # The first call loads the checkpoint; later calls may update any\n"
                "            # subset of the weights.\n"
                "            missing = sorted(\n"
                "                name\n"
                "                for name, param in self.named_parameters()\n"
                "                if name not in loaded_params\n"
                '                and not getattr(param, "_skip_weight_check", False)\n'
                "            )\n"
                "            if missing:\n"
                '                raise ValueError(f"OPT checkpoint lacks weights for {missing}")\n'
                "            self.post_load_weights()\n\n"
                "    def post_load_weights(self):\n"
                "        # Every weight is initialized: by load_weights(), or by a loader that\n"
                '        # bypasses it (e.g. load_format="dummy"). Later calls are updates.\n'
                "        self.weights_initialized = True\n\n"
                "    @property\n    def start_layer(self):\n",
                1,
            ),
            (
                "        self.capture_aux_hidden_states = False\n",
                "        self.capture_aux_hidden_states = False\n        self.weights_initialized = False\n",
                1,
            ),
        ),
    ),
)


def fixed_opt(text: str, tag: str, fixes: tuple[Fix, ...] = FIXES) -> str:
    """Upstream's opt.py ``text`` (at ``tag``) with every fix of ``fixes`` applied (STRICT applies to
    the file with FIXES)."""
    for fix in fixes:
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
