"""The model families the in-process runner serves, by HF architecture (standard library only: the MeZO
command line's ``--help`` lists them without torch).

Each is tested on CPU against HuggingFace on the same weights (runner logits, MeZO; tests/test_families.py,
tests/test_families_mezo.py) on every CPU release, 0.5.13 to 0.5.23, and on the GPU
(tests/gpu/test_families_gpu.py). Others may run: ``RunnerConfig(check_family=False)`` tries one.
"""

FAMILIES = {
    "OPTForCausalLM": "OPT",
    "GPT2LMHeadModel": "GPT-2",
    "LlamaForCausalLM": "Llama 2 / 3",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "GemmaForCausalLM": "Gemma",
}
