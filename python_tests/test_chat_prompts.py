"""Chat templates (kvprec/models/chat.py): the auto / on / off modes, the rendered ids, and `kvprec generate --chat`
on a local model directory with a ChatML-like template and on the byte-level tiny model (no template)."""
import pytest

from helpers import chat_tokenizer
from kvprec.cli import main
from kvprec.models.chat import chat_ids, chat_text, has_chat_template, prompt_token_ids, uses_chat


def _bytes(text):
    return list(text.encode())


def test_modes_resolve_against_the_tokenizer():
    tok = chat_tokenizer()
    assert has_chat_template(tok) and not has_chat_template(None)
    assert uses_chat(tok, "auto") and uses_chat(tok, "on") and not uses_chat(tok, "off")
    assert not uses_chat(None, "auto") and not uses_chat(None, "off")
    with pytest.raises(ValueError, match="--chat on: the model's tokenizer has no chat template"):
        uses_chat(None, "on")
    with pytest.raises(ValueError, match="--chat 'maybe': accepted auto, on, off"):
        uses_chat(tok, "maybe")


def test_prompt_ids_go_through_the_template_only_when_used():
    tok = chat_tokenizer()
    assert chat_text(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = prompt_token_ids(tok, lambda s: tok(s)["input_ids"], "hi")
    assert ids == chat_ids(tok, "hi") and tok.decode(ids) == chat_text(tok, "hi")
    assert prompt_token_ids(tok, _bytes, "hi", "off", plain_suffix="\n\n") == _bytes("hi\n\n")
    assert prompt_token_ids(None, _bytes, "hi") == _bytes("hi")


@pytest.mark.parametrize("chat, templated", [("auto", True), ("on", True), ("off", False)])
def test_generate_puts_the_prompt_through_the_template(capsys, chat_model_dir, chat, templated):
    assert main(["generate", "--model", str(chat_model_dir), "--prompt", "hi", "--chat", chat,
                 "--max-new-tokens", "2", "--block-size", "16"]) == 0
    err = capsys.readouterr().err
    tok = chat_tokenizer()
    prompt_tokens = len(chat_ids(tok, "hi") if templated else tok("hi")["input_ids"])
    assert f"prompt {prompt_tokens} tokens prefilled" in err, err
    assert ("through the chat template" in err) == templated


def test_generate_refuses_chat_on_without_a_template(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", "tiny", "--prompt", "hi", "--chat", "on"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "--chat on: the model's tokenizer has no chat template" in err
