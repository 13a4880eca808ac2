"""Small models kvprec ships or builds: a byte-level Llama trained on Python's own standard library."""
from .tiny import STDLIB_EVAL_FILES, STDLIB_TRAIN_FILES, byte_tokens, load_tiny_llama, stdlib_text, tiny_llama_config

__all__ = ["tiny_llama_config", "load_tiny_llama", "stdlib_text", "byte_tokens", "STDLIB_TRAIN_FILES",
           "STDLIB_EVAL_FILES"]
