"""Generate with a mixed-precision KV cache in three lines, and see what it stores.

    python examples/adaptive_cache_generate.py                 # the built-in tiny model
    python examples/adaptive_cache_generate.py --model DIR     # a local Hugging Face model directory
"""
import argparse

import torch

import kvprec
from kvprec.models.loading import load
from kvprec.models import stdlib_text

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny")
parser.add_argument("--policy", default="sink_window:sinks=4,window=128,rest=int4")
args = parser.parse_args()

loaded = load(args.model)
model = loaded.model
prompt = stdlib_text(["json/decoder.py"])[:700].decode()   # any text; this one ships with Python
ids = torch.tensor([loaded.encode(prompt)])

cache = kvprec.AdaptiveCache(model.config, policy=args.policy)        # 1. the cache
with kvprec.enabled(model):                                          # 2. the "kvprec" attention, restored after
    out = model.generate(ids, attention_mask=torch.ones_like(ids),   # 3. generate as usual
                         past_key_values=cache, max_new_tokens=160, do_sample=False)

print(loaded.decode(out[0, ids.shape[1]:].tolist()))
print(cache.memory_report().format())
