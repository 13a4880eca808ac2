"""The Hugging Face transformers integration: the ``AdaptiveCache`` (cache.py), the "kvprec" attention and mask
functions (attention.py), the precision policies the cache consults (policy/) and the teacher-forced quality
harness (eval.py). Importing this package does not import transformers; its modules do (docs/architecture.md)."""
