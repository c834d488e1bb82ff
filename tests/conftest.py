import os

import torch
from hypothesis import settings

# Property tests run on 2 CPU cores in CI: bounded examples, no per-example deadline.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=150, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

if not torch.cuda.is_available():
    # Triton picks its interpreter when it is imported, and transformers >= 5.24 imports Triton with
    # the models: switch before any test module imports either, so the CPU kernel tests interpret.
    os.environ["TRITON_INTERPRET"] = "1"


# --------------------------------------------------------------------------- tiny LLM families
import pytest  # noqa: E402

import spectralquant as sq  # noqa: E402

TINY_COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
)


def tiny_model(family: str, dtype: torch.dtype = torch.float32):
    """A randomly initialised 4-layer model of ``family`` (GQA 4 query / 2 KV heads, head_dim 16)."""
    import transformers as tf

    specs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
            sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
            sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, sliding_window=16)),
        "granite": ("GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=0.2)),
        "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=16)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    }
    config_cls, model_cls, extra = specs[family]
    kwargs = {**TINY_COMMON, **extra}
    if family == "phi3":
        kwargs.pop("head_dim")  # Phi-3 derives it from hidden_size / heads
    torch.manual_seed(0)
    config = getattr(tf, config_cls)(**kwargs)
    return getattr(tf, model_cls)(config).to(dtype).eval()


FAMILIES = [
    "llama", "gemma3", "gemma2", "qwen2", "mistral", "phi3", "qwen3", "qwen3_moe", "mixtral", "granite",
    "starcoder2", "gemma",
]


@pytest.fixture(scope="session")
def tiny_calibrations():
    """Per family (and ``sq.calibrate`` options): a calibration from 4 x 64 random tokens (cached
    for the session)."""
    cache = {}

    def get(family: str, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            model = tiny_model(family)
            ids = torch.randint(2, 96, (4, 64), generator=torch.Generator().manual_seed(1))
            cache[key] = sq.calibrate(model, token_ids=ids, sensitivity=False, progress=False, **options)
        return cache[key]

    return get
