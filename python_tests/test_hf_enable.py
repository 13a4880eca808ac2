"""kvprec.enable / kvprec.enabled change one thing, the model's attention implementation, and restore it: nothing
else on the model (configs, modules, hooks, parameters) is left changed, also after an exception or nesting.
Registering the "kvprec" names is global but lazy (not at import) and idempotent."""
import copy
import subprocess
import sys

import pytest
import torch

import kvprec
from kvprec.hf import attention

from conftest import FAMILIES


def snapshot(model):
    """Everything enable could touch: every config's attributes, every module's attributes and hooks."""
    configs = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None:
            configs[name] = copy.deepcopy({k: v for k, v in vars(config).items()})
    modules = {name: (type(m), sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks))
               for name, m in model.named_modules()}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return configs, modules, params


def assert_same(before, after):
    assert before[0] == after[0]
    assert before[1] == after[1]
    assert before[2].keys() == after[2].keys() and all(torch.equal(before[2][k], after[2][k]) for k in before[2])


def test_import_registers_nothing():
    code = ("import kvprec, kvprec.hf.cache, kvprec.hf.attention\n"
            "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
            "assert 'kvprec' not in ALL_ATTENTION_FUNCTIONS and 'kvprec' not in ALL_MASK_ATTENTION_FUNCTIONS\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_enabled_restores_everything(tiny_model, family):
    model = tiny_model(family)
    before = snapshot(model)
    previous = model.config._attn_implementation
    with kvprec.enabled(model) as handle:
        assert model.config._attn_implementation == "kvprec" and handle.active
        assert attention.is_registered()
    assert model.config._attn_implementation == previous
    assert_same(before, snapshot(model))


def test_enable_handle_nesting_and_exceptions(tiny_model):
    model = tiny_model("llama")
    before = snapshot(model)
    handle = kvprec.enable(model)
    with kvprec.enabled(model):
        assert model.config._attn_implementation == "kvprec"
    assert model.config._attn_implementation == "kvprec"  # the inner one restores what it found
    handle.disable()
    handle.disable()  # twice is harmless
    assert_same(before, snapshot(model))
    with pytest.raises(RuntimeError, match="boom"):
        with kvprec.enabled(model):
            raise RuntimeError("boom")
    assert_same(before, snapshot(model))


def test_register_is_idempotent():
    attention.register()
    first = dict(attention.ALL_ATTENTION_FUNCTIONS.items())
    attention.register()
    assert dict(attention.ALL_ATTENTION_FUNCTIONS.items()) == first
    assert attention.ALL_ATTENTION_FUNCTIONS["kvprec"] is attention.kvprec_attention_forward


def test_enable_refuses_other_families():
    import transformers

    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                             ffn_dim=16, num_attention_heads=2))
    with pytest.raises(ValueError, match="does not support model_type 'opt'"):
        kvprec.enable(opt)
    assert opt.config._attn_implementation != "kvprec"
