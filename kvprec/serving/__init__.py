"""kvprec in a serving engine (docs/serving.md): the page-size accounting of kvprec's tiers in a vLLM KV cache
spec's terms, and the conversion between kvprec's paged pools and a vLLM-style paged layout of one layer.

Layer 3 (docs/architecture.md): imports only storage and ops. CPU-only, no vLLM import: these are the pieces of
the plan that can be built and checked without the engine."""
from .page_size import SlotField, TierPageSpec, slot_fields
from .vllm_layout import NULL_BLOCK, LayoutMemory, VLLMPagedLayer, from_vllm, to_vllm

__all__ = ["TierPageSpec", "SlotField", "slot_fields", "VLLMPagedLayer", "LayoutMemory", "to_vllm", "from_vllm",
           "NULL_BLOCK"]
