"""Save kvprec's built-in tiny model as a Hugging Face model directory (config.json, weights, a byte-level tokenizer),
so that what takes a Hugging Face checkpoint takes it too: tensor parallelism above all (its 4 attention / 2 KV heads
split over 2 ranks, which SmolLM2's 9 / 3 do not):

    python examples/export_tiny_hf.py --out /tmp/tiny-hf
    kvprec eval --model /tmp/tiny-hf --tp 2 --text /tmp/tiny-hf/eval.txt --policy uniform:int4

The tokenizer gives the tiny model's own tokens, the UTF-8 bytes of the text (kvprec/models/tiny.py: token = byte
value): a byte-level pre-tokenizer maps each byte to one printable character (GPT-2's byte-to-unicode table) and a
word-level vocabulary maps that character to the byte's value; the byte-level decoder maps back. ``eval.txt`` is the
tiny model's held-out text (kvprec.models.STDLIB_EVAL_FILES), the default text of ``kvprec eval --model tiny``.
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def byte_tokenizer():
    """A PreTrainedTokenizerFast whose ids are the UTF-8 bytes of the text: ``tok(s)["input_ids"] ==
    list(s.encode("utf-8"))``, and ``tok.decode`` inverts it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte-to-unicode table, which tokenizers' ByteLevel applies: printable bytes stand for themselves,
    # the others for 256, 257, ... in byte order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}
    if set(table) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("tokenizers' byte-level alphabet is not GPT-2's byte-to-unicode table")
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=chr(256)))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split("", behavior="isolated")])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def export(out: Path) -> Path:
    """Write the tiny model (FP32), its tokenizer and ``eval.txt`` into ``out``; return ``out``."""
    from kvprec.models import STDLIB_EVAL_FILES, stdlib_text
    from kvprec.models.tiny import load_tiny_llama

    out = Path(out)
    model = load_tiny_llama(dtype=torch.float32)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    (out / "eval.txt").write_bytes(stdlib_text(STDLIB_EVAL_FILES))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory to write (created)")
    print(export(p.parse_args().out))


if __name__ == "__main__":
    main()
