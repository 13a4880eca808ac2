"""Shared fixtures: tiny decoder models built from configs (no download), one per supported family.

Every model is FP32, eval mode, seeded, with head_dim 32 (so the default value group of 32 fits), 2 layers, and
sliding windows and softcaps small enough to matter on short sequences. Built once per session and cached;
tests must not change a model's state (use kvprec.enabled(...) context managers, which restore it).

``tiny_model(family)`` returns the model; ``REFERENCE_ATTENTION[family]`` is the stock implementation the
kvprec path is compared with (eager for Gemma 2: SDPA refuses its softcap).
"""
from __future__ import annotations

import functools

import pytest
import torch

TINY_VOCAB = 256
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _configs():
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(_COMMON)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                  dict(_COMMON, use_sliding_window=True, sliding_window=12, max_window_layers=1)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(_COMMON, head_dim=32)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(_COMMON, sliding_window=12)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(_COMMON, head_dim=32)),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
                   dict(_COMMON, head_dim=32, sliding_window=12, query_pre_attn_scalar=32,
                        # a cap of 1.0 makes tanh bend the tiny model's scores, so ignoring it would show
                        attn_logit_softcapping=1.0, final_logit_softcapping=30.0)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                   dict(_COMMON, head_dim=32, sliding_window=12, query_pre_attn_scalar=32,
                        layer_types=["sliding_attention", "full_attention"])),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(vocab_size=TINY_VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
                      eos_token_id=2)),
    }


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gpt2")
REFERENCE_ATTENTION = {family: "sdpa" for family in FAMILIES}
REFERENCE_ATTENTION["gemma2"] = "eager"


@functools.lru_cache(maxsize=None)
def build_tiny(family: str, seed: int = 0, layers: int = 2):
    config_cls, model_cls, kwargs = _configs()[family]
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    config = config_cls(**dict(kwargs, **{key: layers}))
    config._attn_implementation = REFERENCE_ATTENTION[family]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(family, seed=0, layers=2) -> a cached FP32 eval model."""
    return build_tiny


@pytest.fixture
def chat_model_dir(tmp_path, tiny_model):
    """A local Hugging Face directory: the tiny Llama and a character-level tokenizer with a ChatML-like template."""
    from helpers import chat_tokenizer

    path = tmp_path / "tiny-chat"
    tiny_model("llama").save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompts():
    """Token ids: one [1, 21] prompt and a left-padded [2, 21] batch (row 0 has 5 pad positions)."""
    g = torch.Generator().manual_seed(1)
    single = torch.randint(3, TINY_VOCAB, (1, 21), generator=g)
    batch = torch.randint(3, TINY_VOCAB, (2, 21), generator=g)
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    batch[0, :5] = 0
    return {"single": {"input_ids": single, "attention_mask": torch.ones_like(single)},
            "padded": {"input_ids": batch, "attention_mask": mask}}


@pytest.fixture
def scalar_cpu_path():
    """Run the test on the scalar CPU attention path: the one that computes on the dequantized page values, as the
    pure-torch reference does, so a test can hold it to the reference's own tolerance. The SIMD paths score integer
    tiers from their codes within a derived bound (csrc/include/kvprec/cpu_kernels.h), which python_tests/test_cpu_isa.py
    and the C++ test_attention check on every path this CPU has. Without the native library the fixture does nothing."""
    import kvprec

    if not kvprec.native_available():
        yield
        return
    before = torch.ops.kvprec.cpu_isa()
    torch.ops.kvprec.set_cpu_isa("scalar")
    try:
        yield
    finally:
        torch.ops.kvprec.set_cpu_isa(before)
