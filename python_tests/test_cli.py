"""The kvprec command line through its entry point (kvprec.cli.main) on the built-in tiny model: generate's text,
speed line and memory report; bad arguments of generate / eval / info refused in one line with status 2 before a
model loads; real bugs keep their traceback; --dtype auto; info's backends; progress bars; help text."""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvprec
from kvprec.cli import main

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

TINY_CONFIG = json.loads((Path(kvprec.__file__).parent / "models" / "tiny_llama_stdlib.json").read_text())["config"]
TINY_HEAD_DIM = TINY_CONFIG.get("head_dim") or TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]


def run(capsys, *extra):
    assert main(["generate", "--prompt", "def parse(self, text):\n    " * 3, "--max-new-tokens", "6",
                 "--block-size", "8", "--policy", "uniform:int4", "--device", "cpu", *extra]) == 0
    return capsys.readouterr().err


def shadow_bytes(err: str) -> int:
    return int(re.search(r"host shadow (\d+) bytes", err).group(1))


def refused(capsys, argv) -> str:
    """Run ``argv``; assert a refusal: status 2, one line on stderr; return that line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (refusals must come first)."""
    from kvprec.models import loading

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load", load)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A local Hugging Face directory: the tiny test Llama saved in BF16 (its config says dtype bfloat16) with a
    word-level tokenizer over the letters a-z."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import build_tiny

    path = tmp_path_factory.mktemp("hf") / "bf16-llama"
    copy.deepcopy(build_tiny("llama")).to(torch.bfloat16).save_pretrained(path)
    tok = Tokenizer(models.WordLevel(vocab={chr(ord("a") + i): i for i in range(26)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="a").save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- generate
def test_generate_reports_speed_and_memory(capsys):
    err = run(capsys)
    assert re.search(r"6 new tokens in [\d.]+ s = [\d.]+ tokens/s \(policy uniform:int4\)", err)
    assert "compression vs FP16" in err and shadow_bytes(err) == 0
    assert "[tiny, float32] prompt" in err  # --dtype auto: the tiny model's config names no dtype -> float32
    assert re.search(r"decode: 100%.*\| 6/6", err)  # the decode progress bar counted every new token


def test_generate_with_a_host_shadow_reports_its_bytes(capsys):
    err = run(capsys, "--shadow", "cpu", "--backend", "torch")
    tokens = int(re.search(r"(\d+) tokens\n", err).group(1))
    # every sealed position of every layer, K and V, in the model dtype (float32 here)
    sealed = tokens // 8 * 8
    assert shadow_bytes(err) == (TINY_CONFIG["num_hidden_layers"] * TINY_CONFIG["num_key_value_heads"] * sealed
                                 * TINY_HEAD_DIM * 4 * 2)


def test_generate_refuses_an_unknown_shadow(capsys):
    line = refused(capsys, ["generate", "--prompt", "x", "--shadow", "gpu"])
    assert "argument --shadow: invalid choice: 'gpu'" in line


def test_generate_with_key_rotation_counts_the_matrices(capsys):
    err = run(capsys, "--key-rotation", "hadamard")
    assert f"{TINY_CONFIG['num_hidden_layers'] * TINY_HEAD_DIM * TINY_HEAD_DIM * 4} bytes of key rotations" in err


def test_generate_in_bf16_and_under_a_budget(capsys):
    err = run(capsys, "--dtype", "bfloat16", "--bits-per-element", "4.5", "--key-rotation", "orthogonal")
    assert "[tiny, bfloat16] prompt" in err


# ---------------------------------------------------------------------------------------------------- refusals
GENERATE = ["generate", "--prompt", "def f():"]
EVAL = ["eval", "--policy", "uniform:int4"]

REFUSALS = [
    (GENERATE + ["--device", "gpu"], "--device 'gpu' is not accepted; use cpu, cuda or cuda:N"),
    (GENERATE + ["--block-size", "48"], "argument --block-size: 48 is not accepted; use a power of two"),
    (GENERATE + ["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not accepted; use a whole number >= 1"),
    (GENERATE + ["--chunk", "many"], "argument --chunk: 'many' is not a whole number"),
    (GENERATE + ["--policy", "uniform:int9"], ("--policy uniform:int9: ", "'int9'", "accepted fp32, fp16, bf16, int8, "
                                                                                "int4, int2")),
    (GENERATE + ["--policy", "lru"], "--policy lru: unknown policy 'lru'; known policies: attention_mass"),
    (GENERATE + ["--policy", "sink_window:window=-1"], ("--policy sink_window:window=-1: sink_window: ", "window",
                                                        ">= 0")),
    (GENERATE + ["--bits-per-element", "nan"], "argument --bits-per-element: nan is not accepted; use a finite "
                                               "number > 0"),
    # INT2 pages at T=64, D=32, G=32: 2 bits + 32 bits of FP16 scale and zero per channel per block (keys) and per
    # group per token (values): 2 + 32 / 2 * (1 / 64 + 1 / 32) = 2.75
    (GENERATE + ["--bits-per-element", "2.7"], "--bits-per-element 2.7: below 2.75, the bits per element of the "
                                               "floor tier's pages"),
    (GENERATE + ["--key-rotation", "givens"], "argument --key-rotation: invalid choice: 'givens'"),
    (GENERATE + ["--model", "/nonexistent/model"], "--model: '/nonexistent/model' is neither 'tiny', "
                                                   "'smollm2-135m', a .safetensors file of the tiny model, nor a "
                                                   "local Hugging Face model directory"),
    (EVAL + ["--model", "/nonexistent/model"], "--model: '/nonexistent/model' is neither 'tiny'"),
    (EVAL + ["--model", "/nonexistent/tiny.safetensors"], "--model /nonexistent/tiny.safetensors: no such file"),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file /nonexistent/prompt.txt: does not "
                                                               "exist; give a text file"),
    (["generate"], "give a non-empty --prompt TEXT or --prompt-file FILE"),
    (["generate", "--prompt", ""], "give a non-empty --prompt TEXT or --prompt-file FILE"),
    (["eval"], "give at least one --policy or --hf-cache"),
    (EVAL + ["--prefill", "5000"], "--prefill 5000 + --tokens 256 - 1 = 5255 positions, beyond the 4096 of --model "
                                   "tiny (max_position_embeddings)"),
    (EVAL + ["--prefill", "0"], "argument --prefill: 0 is not accepted; use a whole number >= 1"),
    (EVAL + ["--windows", "0"], "argument --windows: 0 is not accepted"),
    (EVAL + ["--rotation-seed", "-1"], "argument --rotation-seed: -1 is not accepted; use a whole number >= 0"),
    (EVAL + ["--group-size", "5"], f"--group-size 5: must divide the model's head_dim {TINY_HEAD_DIM}; accepted 1, "
                                   "2, 4, 8, 16, 32"),
    (EVAL + ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (EVAL + ["--text", "/"], "--text /: is a directory; give a text file"),
    (EVAL + ["--json", "/nonexistent/dir/rows.json"], "--json /nonexistent/dir/rows.json: the directory "
                                                     "/nonexistent/dir does not exist"),
    (EVAL + ["--json", "/"], "--json /: is a directory; give a file name"),
    (["eval", "--hf-cache", "kivi:2"], "--hf-cache kivi:2: hf cache 'kivi:2': accepted 'dynamic', 'quanto:4'"),
    (EVAL + ["--bits-per-element", "2"], "--bits-per-element 2: budget: bits_per_element=2.0 cannot be met"),
    (EVAL + ["--prefill", "500000", "--tokens", "500000", "--windows", "3"],
     "--windows 3 of --prefill 500000 + --tokens 500000 tokens need 3000000 tokens; the default text has"),
    (["info", "--verbose"], "kvprec: error: unrecognized arguments: --verbose (see kvprec --help)"),
]


@pytest.mark.parametrize("argv,message", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_bad_arguments_are_refused_in_one_line_before_loading(capsys, no_model_load, argv, message):
    """``message``: a text in the line, or a tuple of texts (where the lower layers word the reason)."""
    line = refused(capsys, argv)
    for text in (message,) if isinstance(message, str) else message:
        assert text in line
    assert line.startswith(f"kvprec {argv[0]}: error: ") or line.startswith("kvprec: error: ")


def test_a_cuda_device_without_cuda_is_refused(capsys, no_model_load):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = refused(capsys, GENERATE + ["--device", "cuda"])
    assert f"--device cuda: CUDA is not available (torch {torch.__version__}" in line and "use --device cpu" in line


def test_triton_backend_where_triton_cannot_run_is_refused(capsys, no_model_load, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = refused(capsys, GENERATE + ["--backend", "triton", "--device", "cpu"])
    assert "--backend triton: " in line and "use --backend auto" in line
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton runs, but not at the tiny model's head_dim
    line = refused(capsys, GENERATE + ["--backend", "triton", "--device", "cpu"])
    assert f"--backend triton: the model's head_dim {TINY_HEAD_DIM} is not one the Triton kernel takes" in line


def test_a_prompt_beyond_the_models_positions_is_refused_before_any_work(capsys, monkeypatch):
    """The prompt's token count needs the tokenizer: checked after loading, before a cache is built."""
    def no_cache(*args, **kwargs):
        raise AssertionError("a cache was built")

    monkeypatch.setattr(kvprec, "AdaptiveCache", no_cache)
    line = refused(capsys, ["generate", "--prompt", "abcd", "--max-new-tokens", "4094"])  # tiny: 4096 positions
    assert "the prompt's 4 tokens + --max-new-tokens 4094 - 1 = 4097 positions, beyond the 4096 of --model tiny" \
        in line


def test_a_text_shorter_than_the_prefill_is_refused(capsys, no_model_load, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("x" * 50)
    line = refused(capsys, EVAL + ["--text", str(text), "--prefill", "49"])
    assert f"--text {text} has 50 tokens, fewer than --prefill 49 + 2" in line


def test_a_hugging_face_model_needs_a_text(capsys, no_model_load, hf_dir):
    line = refused(capsys, EVAL + ["--model", str(hf_dir)])
    assert f"--model {hf_dir} needs --text FILE (only the tiny model has a default text)" in line


def test_a_directory_that_is_not_a_model_is_refused(capsys, no_model_load, tmp_path):
    line = refused(capsys, GENERATE + ["--model", str(tmp_path)])
    assert f"--model {tmp_path}: not a Hugging Face model directory" in line


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    """Only bad input is reported in one line: a ValueError from inside the run propagates, and --json is not
    written."""
    from kvprec.hf import eval as hf_eval

    def broken(*args, **kwargs):
        raise ValueError("an internal error")

    monkeypatch.setattr(hf_eval, "compare", broken)
    out = tmp_path / "rows.json"
    with pytest.raises(ValueError, match="an internal error"):
        main(EVAL + ["--prefill", "32", "--tokens", "4", "--json", str(out)])
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ --dtype
def test_dtype_auto_reads_the_config():
    from transformers import LlamaConfig

    from kvprec.commands.arguments import UsageError
    from kvprec.commands.model_args import resolve_dtype

    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), "m") == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(dtype="float16"), "m") == torch.float16
    assert resolve_dtype("auto", LlamaConfig(), "m") == torch.float32  # no dtype named: what transformers builds
    assert resolve_dtype("float16", LlamaConfig(dtype="bfloat16"), "m") == torch.float16  # explicit wins
    with pytest.raises(UsageError, match="--dtype auto: the config of --model m names torch.float64"):
        resolve_dtype("auto", LlamaConfig(dtype="float64"), "m")


def test_eval_runs_a_model_in_its_config_dtype(capsys, monkeypatch, hf_dir, tmp_path):
    """--dtype auto on a directory saved in BF16: the model is loaded and run in BF16, and the rows say so; the
    progress bar counts (1 + caches) x (prefill call + decode steps) model calls."""
    from kvprec.models import loading

    dtypes = []
    real_load = loading.load

    def spy(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        dtypes.append((kwargs.get("dtype"), loaded.model.dtype))
        return loaded

    monkeypatch.setattr(loading, "load", spy)
    text, out = tmp_path / "t.txt", tmp_path / "rows.json"
    text.write_text("".join(chr(ord("a") + (i * 7) % 26) for i in range(100)))
    assert main(["eval", "--model", str(hf_dir), "--text", str(text), "--policy", "uniform:int8", "--prefill", "32",
                 "--tokens", "4", "--block-size", "16", "--json", str(out)]) == 0
    assert dtypes == [(torch.bfloat16, torch.bfloat16)]
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and [r["cache"] for r in data["rows"]] == ["reference", "uniform:int8"]
    err = capsys.readouterr().err
    assert re.search(r"uniform:int8: 100%.*\| 8/8", err)  # 2 passes x 4 model calls


def test_eval_on_the_tiny_model_defaults_to_float32(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(EVAL + ["--prefill", "32", "--tokens", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["dtype"] == "float32"
    assert list(tmp_path.iterdir()) == [out]  # written through a temporary file, which is gone


# --------------------------------------------------------------------------------------------------------- info
def test_info_reports_the_cache_backend_apart_from_the_ops(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  cpu +cpp \(the C\+\+ kernel of the native library", out, re.M)
    assert re.search(r"^  decode_attention +auto -> cpu: torch", out, re.M)  # the op alone: the reference on CPU
    assert 'kvprec.ops entry points, each called with backend="auto"' in out


def test_info_reports_the_cpu_isa_path(capsys, monkeypatch):
    """The path kvprec._native.cpu_isa() reports, or, where KVPREC_CPU_ISA named one that cannot run (the library
    then refuses every CPU kernel call), that reason."""
    from kvprec import _native

    isa = _native.cpu_isa()
    assert isa in ("scalar", "avx2", "avx512", "avx512_vnni")
    assert main(["info"]) == 0
    assert f"CPU ISA path:   {isa} (of the C++ CPU kernels" in capsys.readouterr().out

    def refused_path():
        raise RuntimeError("KVPREC_CPU_ISA: 'avx1024' is not a CPU path")

    monkeypatch.setattr(_native, "cpu_isa", refused_path)
    assert main(["info"]) == 0
    assert "CPU ISA path:   none, the CPU kernels refuse to run: KVPREC_CPU_ISA: 'avx1024'" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["info"], ["generate"], ["eval"], ["demo"], ["study"]])
def test_help_exits_0_without_rst_markup(capsys, command):
    """Every subcommand's help (the descriptions are module docstrings: their markup is taken out)."""
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvprec") and "``" not in out and ":func:" not in out


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_policy_help_documents_every_key_of_every_policy(command):
    """The grammar in --policy's help lists each registered policy with every keyword its class takes."""
    import inspect

    from kvprec.cli import build_parser
    from kvprec.hf.policy import registry

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    text = next(a for a in sub._actions if a.dest == "policy").help
    for name in registry.names():
        for key in inspect.signature(registry._FACTORIES[name]).parameters:
            assert re.search(rf"\b{name}:[^\n]*\b{key}=", text), (name, key)
    for word in ("sinks", "window", "rest", "recent", "keep", "--bits-per-element", "NAME[:ARGS]", "key=value"):
        assert word in text


def test_the_installed_command_prints_its_help():
    """The console script pip installs beside this Python (pyproject.toml [project.scripts])."""
    script = Path(sys.executable).with_name("kvprec")
    if not script.is_file():
        pytest.skip(f"no kvprec script beside {sys.executable} (install the package with pip)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "kvprec generate [options]" in result.stdout and result.stderr == ""
