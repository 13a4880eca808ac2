"""Chat templates: the one place that decides whether a prompt goes through the tokenizer's chat template and
renders it. An instruct model (SmolLM2-135M-Instruct: ChatML) answers a user turn followed by the assistant's
generation prompt; a base model or the byte-level tiny model (no tokenizer) takes the text as it is.

The ``chat`` setting of the commands and studies is "auto" (the template where the tokenizer has one), "on" (it must
have one) or "off".
"""
from __future__ import annotations

from typing import List

CHAT_MODES = ("auto", "on", "off")


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` (a Hugging Face tokenizer, or None for a byte-level model) has a chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def uses_chat(tokenizer, chat: str, argument: str = "--chat") -> bool:
    """Resolve a chat mode against a tokenizer: True when prompts go through its template.

    Raises ValueError naming ``argument`` for a mode outside CHAT_MODES, or "on" without a template."""
    if chat not in CHAT_MODES:
        raise ValueError(f"{argument} {chat!r}: accepted {', '.join(CHAT_MODES)}")
    if chat == "on" and not has_chat_template(tokenizer):
        raise ValueError(f"{argument} on: the model's tokenizer has no chat template")
    return has_chat_template(tokenizer) and chat != "off"


def chat_text(tokenizer, message: str) -> str:
    """``message`` as one user turn plus the assistant's generation prompt, rendered by the template (text)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)


def chat_ids(tokenizer, message: str) -> List[int]:
    """The token ids of ``chat_text(tokenizer, message)`` as the template tokenizes them."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def prompt_token_ids(tokenizer, encode, message: str, chat: str = "auto",
                     argument: str = "--chat", plain_suffix: str = "") -> List[int]:
    """The prompt ids of ``message``: through the chat template when ``uses_chat(tokenizer, chat)``, else
    ``encode(message + plain_suffix)`` (``encode``: the model's own text -> ids, e.g. bytes for the tiny model)."""
    if uses_chat(tokenizer, chat, argument):
        return chat_ids(tokenizer, message)
    return list(encode(message + plain_suffix))
