"""Chat transcripts that SmolLM2-135M-Instruct writes itself: the "chat" text kind of examples/quality_suite.py.

    python examples/make_chat_transcripts.py --out examples/data/chat_smollm2.txt

Each conversation starts from one of the user prompts below; the model answers greedily (no sampling, so the file is
the same on every run of the same model and transformers), and the next user turn is the next prompt, until the
transcript is at least ``--min-tokens`` long. The file holds the chat-template rendering of every conversation,
separated by blank lines, exactly as the model sees it when it is fed back through the quality harness.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

PROMPTS = [
    "Explain how a hash table handles collisions, with a short example.",
    "What are the main causes of the seasons on Earth?",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Summarise the plot of a detective story you invent, in five sentences.",
    "How does compound interest work? Give a worked example with numbers.",
    "What is the difference between a process and a thread?",
    "Give me three tips for writing clear technical documentation.",
    "Describe the water cycle step by step.",
    "Why do we use version control? Answer as if to a new programmer.",
    "Plan a three-day trip to a mountain town, with one activity per morning and afternoon.",
    "Explain recursion using the example of computing factorials.",
    "What makes a good unit test?",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="an instruct model kvprec.models.load accepts")
    p.add_argument("--out", default="examples/data/chat_smollm2.txt")
    p.add_argument("--min-tokens", type=int, default=10000, help="stop once the transcripts hold this many tokens")
    p.add_argument("--turns", type=int, default=3, help="user turns per conversation")
    p.add_argument("--max-new-tokens", type=int, default=320, help="per answer")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from kvprec.models import load

    loaded = load(args.model)
    tok = getattr(loaded, "tokenizer", None)
    if tok is None or getattr(tok, "chat_template", None) is None:
        raise SystemExit(f"--model: {args.model!r} has no chat template; this script needs an instruct model")
    model = loaded.model
    texts, total, start, i = [], 0, time.perf_counter(), 0
    while total < args.min_tokens:
        messages = []
        for turn in range(args.turns):
            messages.append({"role": "user", "content": PROMPTS[(i + turn) % len(PROMPTS)]})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            messages.append({"role": "assistant", "content": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
        text = tok.apply_chat_template(messages, tokenize=False)
        texts.append(text)
        total += len(tok(text)["input_ids"])
        i += args.turns
        print(f"conversation {len(texts)}: {total} tokens so far ({time.perf_counter() - start:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n\n".join(texts))
    print(f"wrote {args.out}: {len(texts)} conversations, {total} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
