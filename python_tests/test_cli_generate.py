"""`kvprec generate` on the built-in tiny model: text, speed line, memory report; --shadow and --backend."""
import re

import pytest

import kvprec

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def run(capsys, *extra):
    from kvprec.cli import main

    assert main(["generate", "--prompt", "def parse(self, text):\n    " * 3, "--max-new-tokens", "6",
                 "--block-size", "8", "--policy", "uniform:int4", "--device", "cpu", *extra]) == 0
    return capsys.readouterr().err


def shadow_bytes(err: str) -> int:
    return int(re.search(r"host shadow (\d+) bytes", err).group(1))


def test_generate_reports_speed_and_memory(capsys):
    err = run(capsys)
    assert re.search(r"6 new tokens in [\d.]+ s = [\d.]+ tokens/s \(policy uniform:int4\)", err)
    assert "compression vs FP16" in err and shadow_bytes(err) == 0


def test_generate_with_a_host_shadow_reports_its_bytes(capsys):
    import json
    from pathlib import Path

    err = run(capsys, "--shadow", "cpu", "--backend", "torch")
    cfg = json.loads((Path(kvprec.__file__).parent / "models" / "tiny_llama_stdlib.json").read_text())["config"]
    tokens = int(re.search(r"(\d+) tokens\n", err).group(1))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    # every sealed position of every layer, K and V, in the model dtype (float32 here)
    sealed = tokens // 8 * 8
    assert shadow_bytes(err) == cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * sealed * head_dim * 4 * 2


def test_generate_refuses_an_unknown_shadow(capsys):
    from kvprec.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--shadow", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_generate_with_key_rotation_counts_the_matrices(capsys):
    import json
    from pathlib import Path

    cfg = json.loads((Path(kvprec.__file__).parent / "models" / "tiny_llama_stdlib.json").read_text())["config"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    err = run(capsys, "--key-rotation", "hadamard")
    assert f"{cfg['num_hidden_layers'] * head_dim * head_dim * 4} bytes of key rotations" in err
