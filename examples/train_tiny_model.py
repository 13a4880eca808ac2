"""Train the tiny byte-level Llama on Python's standard library (no download: the text ships with Python).

    python examples/train_tiny_model.py --out kvprec/models/tiny_llama_stdlib.safetensors          # CPU, ~2 min
    python examples/train_tiny_model.py --layers 4 --hidden 256 --heads 4 --kv-heads 2 --seq 1024 --batch 8 \
        --steps 1800 --lr 2e-3 --out examples/models/small_llama_stdlib.safetensors            # CPU, ~42 min
    python examples/train_tiny_model.py --device cuda --layers 8 --hidden 512 --heads 8 --kv-heads 2 \\
        --steps 3000 --seq 1024 --out /tmp/llama_stdlib_8L.safetensors                            # GPU machine

Writes the weights (FP16 safetensors), a JSON beside them with the config overrides and the training log
(loss every 25 steps and the held-out loss on STDLIB_EVAL_FILES at the end). Deterministic for a seed on CPU.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from kvprec.models import STDLIB_EVAL_FILES, STDLIB_TRAIN_FILES, byte_tokens, stdlib_text, tiny_llama_config


def held_out_loss(model, tokens, seq, device, batches=8):
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(batches):
            x = tokens[i * seq:(i + 1) * seq].unsqueeze(0).to(device)
            if x.shape[1] < seq:
                break
            losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return sum(losses) / len(losses)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    overrides = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                     num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(args.device)
    train = byte_tokens(stdlib_text(STDLIB_TRAIN_FILES))
    held = byte_tokens(stdlib_text(STDLIB_EVAL_FILES))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    log, t0 = [], time.time()
    for step in range(args.steps):
        ix = torch.randint(0, len(train) - args.seq - 1, (args.batch,))
        x = torch.stack([train[i:i + args.seq] for i in ix.tolist()]).to(args.device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)})
            print(log[-1], flush=True)
    final = held_out_loss(model, held, args.seq, args.device)
    print(f"held-out loss {final:.4f} nats/byte ({final / math.log(2):.3f} bits/byte)")
    out = Path(args.out)
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(out))
    out.with_suffix(".json").write_text(json.dumps(
        {"config": overrides, "args": vars(args), "train_files": STDLIB_TRAIN_FILES, "eval_files": STDLIB_EVAL_FILES,
         "held_out_loss": final, "log": log, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
