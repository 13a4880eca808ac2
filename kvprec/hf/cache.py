"""AdaptiveCache: a Hugging Face ``Cache`` whose layers store K/V in a MixedPrecisionBuffer.

Use::

    cache = kvprec.AdaptiveCache(model.config, policy="sink_window:window=256")   # or AdaptiveCache()
    with kvprec.enabled(model):
        out = model.generate(**inputs, past_key_values=cache)

Each layer owns one buffer (created at its first update from the K/V shape, dtype and device): blocks of
``block_size`` positions, sealed when full into the tier the policy assigns per (batch row, KV head), the
newest positions in an unsealed tail in the model dtype. ``update()`` returns a :class:`KVHandle`, not tensors,
while the model runs the "kvprec" attention function (kvprec/hf/attention.py), which attends over the stored
tiers one block at a time. When the model runs another attention implementation the layer returns the K/V
gathered back to the model dtype (correct, slow, warned once, with the reason).

The config: ``AdaptiveCache(model.config)`` (or the model itself), or ``AdaptiveCache()`` as one writes
``DynamicCache()``: ``kvprec.enable(model)`` binds such a cache to the model at its first forward (the cache then
is what ``AdaptiveCache(model.config)`` would be); a cache no enabled model has bound grows its layers on demand,
like ``DynamicCache()``, and returns gathered tensors (it cannot tell which attention runs).

Only decoder families whose attention passes the cache's return value straight to the attention function are
accepted (SUPPORTED_MODEL_TYPES); others are refused when the config is known rather than failing later on a
handle. Sliding-window layers (Mistral, Qwen2/3, Gemma 2/3: the layers ``DynamicCache(config=...)`` would make
``DynamicSlidingWindowLayer``) evict the sealed blocks that no later query's window reaches, so they hold at most
window + 2 blocks of positions, as DynamicCache holds ``window - 1``; positions keep their numbering (the block
table keeps an entry per evicted block, with no page). While transformers records the past for a rollback
(``activate_past_recording``: assisted decoding, deferred stopping) eviction waits for the next ``crop``, which
trims; a crop back past evicted positions raises, as DynamicCache's does. ``evict_sliding=False`` keeps every
position (studies that read all of them).

``key_rotation`` ("hadamard" or "orthogonal", kvprec/storage/rotation.py) stores every key as k R for a fixed
orthogonal R per layer and rotates the queries the same way before attending, which leaves the scores unchanged and
makes 2-bit keys far more accurate; ``gather()`` rotates the keys back, so everything outside the attention sees the
model's keys. ``value_rotation`` (same kinds, each layer its own matrix S) stores every value as v S; the attention
over them gives o S, which ``AdaptiveLayer.attend`` rotates back (o S S^T = o) on every path (block kernel, CPU
prefill split, the torch reference, Triton and CUDA), and ``gather()`` returns the model's values.

What a layer shows of its contents: ``layer.keys`` / ``layer.values`` are dense copies in the model dtype (rotation
undone), built at first read and reused until the layer changes, holding what ``DynamicCache(config=...)``'s layer
of the same kind would hold (every position; a sliding layer the last ``window - 1``): transformers and its tests
read them. They are copies, not the storage: writing into them changes nothing, and assigning them is refused.

Faults leave no silent damage. A K/V with NaN or Inf is refused at the update that brings it (layer, position and
row named), before anything is stored. A forward whose update fails at layer j (or that raises between layers)
leaves layers < j one step longer: the next forward's first update sees the lengths differ and raises
:class:`PartialForwardError` naming them and the recovery, ``cache.crop_to_shortest()`` (drop what the failed
forward added) or ``cache.reset()``. Updates are not transactional: the cache cannot see an exception raised in the
model between two layers, so it detects the damage at the next use instead of undoing it.

``copy.deepcopy``, ``pickle`` and ``torch.save`` / ``torch.load(..., weights_only=False)`` give an exact copy (tiers,
pages, tail, shadow, policy state). A deep copy shares the model's config with the original (the cache reads the
model's attention implementation from it); an unpickled cache holds a copy of the config and gathers tensors until
``kvprec.enable(model)`` binds it to the model again at its next forward.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .policy.registry import get as get_policy
from . import prefill
from .._native import require_native
from ..ops.reference.attention import ReadCounter, attend_blocks
from ..storage.formats import BlockGeometry, Tier
from .arguments import BACKENDS, MAX_BLOCK_SIZE, check_cache_arguments, check_model_geometry, config_head_dim
from .policy.base import AttentionStats, SealStats
from ..storage.rotation import check_kind, rotate, rotation_matrix, unrotate

__all__ = ["AdaptiveCache", "AdaptiveLayer", "CacheMemoryReport", "KVHandle", "PartialForwardError",
           "Int2KeysWarning", "SUPPORTED_MODEL_TYPES", "BACKENDS", "MAX_BLOCK_SIZE"]

#: ``config.model_type`` of the text decoder, for the families whose attention modules hand ``update()``'s
#: return value to the attention function unchanged (checked in transformers 5.23, docs/hf_integration.md).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")

#: The name under which kvprec/hf/attention.py registers its attention and mask functions with transformers.
ATTENTION_NAME = "kvprec"


def is_kvprec_attention(fn) -> bool:
    """Whether ``fn`` is kvprec's attention function (kvprec/hf/attention.py marks it with ``__kvprec_attention__``),
    also inside wrappers that keep ``__wrapped__`` (functools.wraps: profilers, tracers)."""
    for _ in range(64):  # a wrapper chain longer than this is a loop, not a profiler
        if fn is None:
            return False
        if getattr(fn, "__kvprec_attention__", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def kvprec_attention_mismatch(config) -> Optional[str]:
    """None when a model with this (text) config runs kvprec's attention over the cache; else why it does not, in
    words (the slow-path warning says it). Cheap when it matches: a config read and two registry lookups."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if config is None:
        return ("the cache was built without a config (AdaptiveCache()) and no kvprec.enable(model) has bound it to "
                "a model, so it cannot tell which attention runs")
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != ATTENTION_NAME:
        return f"its attention implementation is {implementation!r}"
    fn = ALL_ATTENTION_FUNCTIONS.get(ATTENTION_NAME)
    if not is_kvprec_attention(fn):
        return (f"transformers maps {ATTENTION_NAME!r} to {_name(fn)}, which is not kvprec's attention function nor a "
                "wrapper of it that keeps __wrapped__ (use functools.wraps in a wrapper)")
    mask = ALL_MASK_ATTENTION_FUNCTIONS.get(ATTENTION_NAME)
    if mask is not sdpa_mask:
        return f"the mask function registered for {ATTENTION_NAME!r} is {_name(mask)}, not transformers' sdpa_mask"
    return None


class PartialForwardError(RuntimeError):
    """The cache's layers hold different numbers of positions: a forward stopped part-way (an exception after some
    layers had stored its tokens). Recover with ``cache.crop_to_shortest()`` or ``cache.reset()``."""


class Int2KeysWarning(UserWarning):
    """Blocks go to INT2 with keys stored as given (no ``key_rotation``); code that compares against such caches on
    purpose filters this category."""


def text_config(config):
    """The decoder's text config (itself for text-only models)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def as_config(obj):
    """The decoder's text config from a config or a model (its ``.config``); ValueError saying what to pass for
    anything else."""
    if isinstance(obj, torch.nn.Module) and hasattr(obj, "config"):
        obj = obj.config
    if not (hasattr(obj, "get_text_config") or hasattr(obj, "model_type")):
        raise ValueError(f"AdaptiveCache: config must be the model's config (model.config), the model itself, or None "
                         f"(bound to the model by kvprec.enable(model)); got {type(obj).__name__}")
    return text_config(obj)


def check_supported(config) -> None:
    """Raise ValueError unless the model (or config) is of a family the cache supports (SUPPORTED_MODEL_TYPES)."""
    model_type = getattr(as_config(config), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"kvprec does not support model_type {model_type!r}: its attention must pass the cache's "
                         f"handle to the attention function, which is checked for {', '.join(SUPPORTED_MODEL_TYPES)}")


class KVHandle:
    """What ``AdaptiveLayer.update`` returns for key and value: a reference to the layer, read by the "kvprec"
    attention function. Anything else that treats it as a tensor gets an error saying what went wrong."""

    __slots__ = ("layer",)

    def __init__(self, layer: "AdaptiveLayer"):
        self.layer = layer

    def __getattr__(self, name):
        raise AttributeError(f"a kvprec KVHandle (layer {self.layer.layer_idx}) has no {name!r}: the cache returned "
                             "a handle, so the model must run the 'kvprec' attention; use kvprec.enable(model)")

    def __repr__(self):
        return f"KVHandle(layer={self.layer.layer_idx}, seq_len={self.layer.get_seq_length()})"


def sliding_windows(config) -> list[int]:
    """Per decoder layer, the sliding window of its attention (0 = full attention): the layers that
    ``DynamicCache(config=...)`` makes sliding (``transformers.cache_utils.get_layer_types_and_kwargs``)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config)
    return [int(kw.get("sliding_window") or 0) if t == "sliding_attention" else 0 for t, kw in zip(types, kwargs)]


class AdaptiveLayer(CacheLayerMixin):
    """One layer of an :class:`AdaptiveCache` over one MixedPrecisionBuffer (``self.buffer``).

    ``sliding_window`` > 0: the layer evicts the sealed blocks that no later query can see (module docstring).
    """

    is_compileable = False
    is_croppable = True  # exact with a shadow; without one, a crop inside an integer block dequantizes it
    # False also for sliding layers: positions keep their numbering and the mask spans all of them, where HF's
    # sliding layers return (and mask) only the window.
    is_sliding = False

    def __init__(self, cache: "AdaptiveCache", layer_idx: int, sliding_window: int = 0):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.sliding_window = int(sliding_window)
        #: set by transformers before a loop that may roll back (activate_past_recording): evict only at crop
        self.record_past = False
        self.buffer = None
        self.rows = 0  # batch rows held (not `batch_size`: Cache.batch_size reads that name from layers)
        self.stats: Optional[AttentionStats] = None
        self.geometry: Optional[BlockGeometry] = None
        #: bumped whenever the block table or the pools change (seal, re-tier, crop, batch selection, reset); the
        #: host tiers, the kernels' PagedKV view and the policies' rebalance memo are kept until it moves
        self.table_version = 0
        self.rebalance_memo: dict = {}
        self._paged = None
        self._tiers: Optional[torch.Tensor] = None
        #: FP32 [D, D] orthogonal matrix the keys are stored multiplied by (None: keys as the model gave them)
        self.rotation: Optional[torch.Tensor] = None
        #: FP32 [D, D] orthogonal matrix the values are stored multiplied by (None: values as the model gave them)
        self.value_rotation: Optional[torch.Tensor] = None
        #: the dense (K, V) that ``keys`` / ``values`` return, built at first read, dropped by any change
        self._dense: Optional[tuple] = None
        #: first position DynamicSlidingWindowLayer would still hold (sliding layers; 0 otherwise), see ``keys``
        self._dense_start = 0

    # ---- the dense view transformers reads ------------------------------------------------------------------
    @property
    def keys(self) -> Optional[torch.Tensor]:
        """Dense K [B, H_kv, n, D] in the model dtype (rotation undone), a copy built at first read and reused until
        the layer changes; None before the first update. What ``DynamicCache(config=...)``'s layer of the same kind
        would hold: every position, or for a sliding-window layer the last ``window - 1`` (all of them since
        ``activate_past_recording`` until the next crop, as DynamicSlidingWindowLayer). The storage is the buffer:
        writing into this tensor changes nothing (read all positions with :meth:`gather`)."""
        dense = self._dense_kv()
        return None if dense is None else dense[0]

    @property
    def values(self) -> Optional[torch.Tensor]:
        """Dense V, as :attr:`keys`."""
        dense = self._dense_kv()
        return None if dense is None else dense[1]

    @keys.setter
    def keys(self, value) -> None:
        self._refuse_dense_assignment("keys", value)

    @values.setter
    def values(self, value) -> None:
        self._refuse_dense_assignment("values", value)

    def _refuse_dense_assignment(self, name: str, value) -> None:
        if value is not None:  # CacheLayerMixin.__init__ assigns None; anything else would be silently ignored
            raise AttributeError(f"AdaptiveLayer.{name} is a read-only dense copy of the layer's buffer; store K/V "
                                 "with update()")

    def _dense_kv(self) -> Optional[tuple]:
        if self.buffer is None:
            return None
        if self._dense is None:
            self._dense = self._unrotated(*self.buffer.gather(self._dense_start, self.get_seq_length()))
        return self._dense

    def _follow_sliding_window(self) -> None:
        """After an update (not recording the past) or a crop: the positions DynamicSlidingWindowLayer keeps are
        the last window - 1 (all of them while shorter)."""
        n = self.get_seq_length()
        if self.sliding_window:
            self._dense_start = min(max(self._dense_start, n - self.sliding_window + 1), n)
        self._dense = None

    def __getstate__(self) -> dict:
        """Pickling: the derived views (tiers, PagedKV, dense copy) and the policies' memo are rebuilt on use."""
        state = dict(self.__dict__)
        state.update(_paged=None, _tiers=None, _dense=None, rebalance_memo={})
        return state

    # ---- members the policies use (kvprec/hf/policy/base.py) ------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def wants_attention_mass(self) -> bool:
        return self.stats is not None

    @property
    def evicted_blocks(self) -> int:
        """Sealed blocks [0, evicted_blocks) were evicted by the sliding window (tier ``formats.EVICTED`` in
        tiers())."""
        return 0 if self.buffer is None else self.buffer.evicted_blocks

    def tiers(self) -> torch.Tensor:
        """int8 [B, H_kv, n_sealed], a host tensor shared until the table changes: read it, do not modify it.
        Evicted blocks (the first ``evicted_blocks``) read ``formats.EVICTED`` (-1)."""
        if self.buffer is None:
            return torch.zeros(0, 0, 0, dtype=torch.int8)
        if self._tiers is None:
            self._tiers = self.buffer.tiers().cpu()
        return self._tiers

    def set_block_tiers(self, index: int, tiers: torch.Tensor) -> None:
        tiers = tiers.to(torch.int8).cpu()
        self.cache.check_int2_keys(tiers)
        self.buffer.set_block_tiers(index, tiers)
        self._table_changed()

    def _table_changed(self) -> None:
        self.table_version += 1
        self._paged = self._tiers = self._dense = None

    def paged(self):
        """The buffer as the kernels read it (:class:`~kvprec.ops.reference.PagedKV`).

        The pools and the device copy of the block table are taken once and reused until a seal, re-tier, crop or
        batch selection changes them (each of those goes through this layer and drops the copy); only the tail
        views are set fresh on each call, in place: the object returned is valid until the layer's next update.
        Rebuilding it every step would cost two host table copies, two host-to-device uploads and a dozen pool
        lookups per layer per decode step (and a dataclass copy per call, ~5 us, is host time a decode step lacks).
        """
        from ..ops.reference import PagedKV

        if self._paged is None:
            self._paged = PagedKV.from_buffer(self.buffer)
        self._paged.tail_k, self._paged.tail_v = self.buffer.tail_keys(), self.buffer.tail_values()
        return self._paged

    def memory(self):
        return self.buffer.memory()

    # ---- the HF layer interface ----------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from ..storage.buffer import MixedPrecisionBuffer

        b, h, _, d = key_states.shape
        c = self.cache
        self.geometry = check_model_geometry(d, c.block_size, c.group_size, c.key_rotation, c.backend, c.policy,
                                             where=f"AdaptiveCache layer {self.layer_idx}",
                                             value_rotation=c.value_rotation)
        self.dtype, self.device = key_states.dtype, key_states.device
        try:
            if c.key_rotation is not None:
                self.rotation = rotation_matrix(c.key_rotation, d, c.rotation_seed, self.layer_idx,
                                                "keys").to(key_states.device)
            if c.value_rotation is not None:
                self.value_rotation = rotation_matrix(c.value_rotation, d, c.rotation_seed, self.layer_idx,
                                                      "values").to(key_states.device)
        except ValueError as exc:
            raise ValueError(f"AdaptiveCache layer {self.layer_idx}: {exc}") from exc
        self.buffer = MixedPrecisionBuffer(batch=b, kv_heads=h, head_dim=d, block_size=self.cache.block_size,
                                           group_size=self.geometry.group_size, dtype=key_states.dtype,
                                           device=key_states.device, shadow=self.cache.shadow)
        self.rows = b
        self.stats = (AttentionStats.empty(b, h, key_states.device)
                      if self.cache.policy.wants_attention_mass else None)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append k, v [B, H_kv, n, D]; seal the blocks that fill, at the policy's tiers; let the policy re-tier.

        Returns (handle, handle) while the model runs the "kvprec" attention, else the whole K/V
        [B, H_kv, seq_len, D] gathered back to the model dtype. NaN or Inf in k or v is refused before anything
        is stored (ValueError naming the layer, position, batch row and KV head).
        """
        self._check_finite(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotation is not None:
            key_states = rotate(key_states, self.rotation)
        if self.value_rotation is not None:
            value_states = rotate(value_states, self.value_rotation)
        if not self.record_past:  # before the append, so the seal can reuse the freed pages
            self._evict(self.get_seq_length())
        n = key_states.shape[-2]
        sealing = self.buffer.blocks_sealed_by(n)
        tiers = None
        if sealing:
            first = self.buffer.num_sealed_blocks
            b, h = key_states.shape[:2]
            stats = SealStats(b, h, self.block_size, self.get_seq_length() + n, key_states, value_states, self)
            tiers = self._checked(self.cache.policy.assign(self.layer_idx, range(first, first + sealing), stats),
                                  (b, h, sealing))
            self.cache.check_int2_keys(tiers)
        self.buffer.append(key_states, value_states, tiers)
        if sealing:
            self._table_changed()
        if self.record_past:
            self._dense = None
        else:
            self._follow_sliding_window()
        if self.stats is not None:
            self.stats.resize(math.ceil(self.get_seq_length() / self.block_size))
        self.cache.policy.rebalance(self.cache, self.layer_idx)
        why = self.cache.attention_mismatch()
        if why is None:
            handle = KVHandle(self)
            return handle, handle
        self.cache.warn_slow_path(why)
        return self.gather()

    def _check_finite(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Refuse NaN / Inf before it reaches the tail (where it would be refused only when its block seals, blamed
        on a later append). Fast path: the FP32 sums of k and v are finite (NaN and Inf propagate into a sum; a sum
        that overflows from finite BF16 values only sends the check to the exact pass below, which finds nothing).
        Two reductions and one host read per update (a device sync on GPU), ~8 us on a busy CPU core."""
        f32 = torch.float32
        if k.is_cuda:
            total = float(k.sum(dtype=f32) + v.sum(dtype=f32))  # one synchronisation
        else:
            total = float(k.sum(dtype=f32)) + float(v.sum(dtype=f32))  # two host reads are cheaper than one add op
        if math.isfinite(total):
            return
        for name, x in (("key", k), ("value", v)):
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                b, h, t, d = (int(i) for i in torch.nonzero(bad)[0])
                raise ValueError(f"AdaptiveCache layer {self.layer_idx}: the {name} at position "
                                 f"{self.get_seq_length() + t} (batch row {b}, KV head {h}, channel {d}) is "
                                 f"{float(x[b, h, t, d])}; nothing of this update was stored (the model produced "
                                 "non-finite K/V: check its inputs and dtype)")

    def _checked(self, tiers, shape) -> torch.Tensor:
        name = self.cache.policy.describe()
        if not isinstance(tiers, torch.Tensor) or tuple(tiers.shape) != shape:
            got = tuple(tiers.shape) if isinstance(tiers, torch.Tensor) else type(tiers).__name__
            raise ValueError(f"policy {name}.assign returned {got}; expected int8 tiers of shape {shape}")
        if tiers.is_floating_point() or tiers.dtype == torch.bool or bool(((tiers < 0) | (tiers >= len(Tier))).any()):
            raise ValueError(f"policy {name}.assign returned tiers outside 0..{len(Tier) - 1}: {tiers.unique()}")
        return tiers.to(torch.int8).cpu()

    def gather(self):
        """All positions back in the model dtype, (K, V) [B, H_kv, seq_len, D]. Evicted positions read as zeros:
        they lie outside every later query's sliding window, so the model's sliding mask hides them."""
        start = self.evicted_blocks * self.block_size
        k, v = self._unrotated(*self.buffer.gather(start, self.get_seq_length()))
        if start:
            pad = (0, 0, start, 0)
            k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
        return k, v

    def _unrotated(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Stored K, V [B, H_kv, n, D] with the key and value rotations undone: the model's K, V."""
        if self.rotation is not None:
            k = unrotate(k, self.rotation)
        if self.value_rotation is not None:
            v = unrotate(v, self.value_rotation)
        return k, v

    # ---- sliding-window eviction ---------------------------------------------------------------------------
    def activate_past_recording(self) -> None:
        """Called by transformers before a loop that may crop (assisted decoding, deferred stopping): keep the
        blocks the window has passed until the next crop, as ``DynamicSlidingWindowLayer`` does."""
        self.record_past = True

    def _evict(self, next_query: int) -> None:
        """Evict the sealed blocks that no query at position >= ``next_query`` can see: block j's last position
        (j+1)T - 1 must be <= next_query - window, so count = (next_query - window + 1) // T."""
        if not self.sliding_window or self.buffer is None:
            return
        count = min(self.buffer.num_sealed_blocks, max(0, next_query - self.sliding_window + 1) // self.block_size)
        if count > self.buffer.evicted_blocks:
            self.buffer.evict_blocks(count)
            self._table_changed()

    def attend(self, q: torch.Tensor, mask: Optional[torch.Tensor], scale: float, sliding_window: int,
               softcap: float, block_mass: bool):
        """Attention of q [B, Hq, Q, D] over this layer: (out [B, Hq, Q, D], lse [B, Hq, Q], block_mass).

        On the "cpp" backend a CPU prefill chunk (Q >= prefill.MIN_QUERIES, no softcap, no block mass) reads the
        stored K/V back part by part through torch's flash-attention kernel, merged by log-sum-exp
        (kvprec/hf/prefill.py); decode and short chunks go to the block kernel. With value rotation every path
        attends over the stored v S and gives o S; it is rotated back here, once per call."""
        if self.rotation is not None:  # stored keys are k R: (q R) . (k R) = q . k
            q = rotate(q, self.rotation)
        out, lse, mass = self._attend_stored(q, mask, scale, sliding_window, softcap, block_mass)
        if self.value_rotation is not None:  # stored values are v S: sum_j p_j v_j S = o S
            out = unrotate(out, self.value_rotation)
        return out, lse, mass

    def _attend_stored(self, q: torch.Tensor, mask: Optional[torch.Tensor], scale: float, sliding_window: int,
                       softcap: float, block_mass: bool):
        """:meth:`attend` over the K/V as stored (q already rotated as the keys are; the output as the values are)."""
        backend = self.cache.attention_backend(q)
        if backend == "cpp" and prefill.applies(q, softcap, block_mass):
            return prefill.attend_split(self, q, mask, scale, sliding_window)
        if backend == "torch":
            return attend_blocks(self.buffer, q, mask, scale, sliding_window, softcap, block_mass,
                                 counter=self.cache.read_counter)
        if backend in ("triton", "cuda"):
            from .. import ops

            out, lse, mass = ops.decode_attention(q, self.paged(), scale=scale or None, mask=mask,
                                                  sliding_window=sliding_window, softcap=softcap,
                                                  block_mass=block_mass, backend=backend)
            return out, lse, mass if mass is not None else torch.empty(0, device=q.device)
        return self.buffer.attend(q, mask, scale=scale, sliding_window=sliding_window, softcap=softcap,
                                  block_mass=block_mass)

    def record_attention(self, block_mass: torch.Tensor) -> None:
        """Accumulate the kernel's block mass [B, Hq, Q, n_blocks] and pass it to the policy."""
        self.stats.add(block_mass, self.get_seq_length(), self.block_size)
        self.cache.policy.on_attention(self.layer_idx, block_mass)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.buffer is None else self.buffer.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.buffer, self.stats, self.geometry, self.rows, self.rotation = None, None, None, 0, None
        self.value_rotation = None
        self._dense_start = 0
        self._table_changed()
        self.is_initialized = False

    def _index_batch(self, idx, what: str) -> None:
        """Keep batch rows ``idx`` (integer [B']) in that order. Floats (truncated), bool masks (read as 0/1) and
        rows out of range are refused, naming ``what`` (the method called)."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            raise ValueError(f"{what}: a bool mask is not accepted (DynamicCache refuses it too); pass the integer "
                             "indices of the rows to keep, e.g. mask.nonzero().flatten()")
        if idx.is_floating_point() or idx.is_complex() or idx.dim() != 1:
            raise ValueError(f"{what}: expected integer row indices [B'], got {idx.dtype} of shape {tuple(idx.shape)}")
        if self.buffer is None:
            return
        idx = idx.to(torch.int64).cpu()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.rows:
            raise ValueError(f"{what}: row indices {idx.tolist()} are not accepted; the cache holds rows "
                             f"0..{self.rows - 1} (at least one index, none negative)")
        self.buffer.index_batch(idx)
        self._table_changed()
        self.rows = idx.numel()
        if self.stats is not None:
            self.stats.index_batch(idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx, "reorder_cache(beam_idx)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"batch_repeat_interleave: repeats must be a whole number >= 1, got {repeats!r}")
        self._index_batch(torch.arange(self.rows).repeat_interleave(repeats), "batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices, "batch_select_indices(indices)")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers v5: the argument is <= 0)."""
        self.check_crop(tokens_to_remove)
        if self.buffer is None:
            return
        new_len = self.get_seq_length() + tokens_to_remove
        if tokens_to_remove == 0:  # transformers' crop(0) under record_past: trim what the window has passed
            self._evict(new_len)
            self._follow_sliding_window()  # as DynamicSlidingWindowLayer.crop: keys shrink back to the window
            return
        self.buffer.crop(new_len)
        self._table_changed()
        self._follow_sliding_window()
        if self.stats is not None:
            self.stats.resize(math.ceil(new_len / self.block_size))
            if new_len % self.block_size:  # the partly kept block's mass includes dropped positions: forget it
                self.stats.mass[..., -1] = 0
                self.stats.seen[-1] = 0
        self._evict(new_len)  # after a rollback, what the window has passed goes (DynamicSlidingWindowLayer.crop)

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise ValueError if ``crop(tokens_to_remove)`` cannot be done (nothing is changed)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to drop (transformers v5 "
                             "convention); a positive target length is not supported")
        if self.buffer is None:
            return
        new_len = self.get_seq_length() + tokens_to_remove
        if new_len < 0:
            raise ValueError(f"crop({tokens_to_remove}): the layer holds only {self.get_seq_length()} tokens")
        held = self.evicted_blocks * self.block_size
        if tokens_to_remove and held and held - 1 > new_len - self.sliding_window:
            raise ValueError(f"crop({tokens_to_remove}): layer {self.layer_idx} has evicted positions < {held} "
                             f"(sliding window {self.sliding_window}), and a query at position {new_len} would see "
                             "some of them; call cache.activate_past_recording() before decoding steps you may roll "
                             "back, or build the AdaptiveCache with evict_sliding=False")

    def offload(self):
        raise NotImplementedError("AdaptiveCache does not support offloading (Cache(offloading=True))")

    def prefetch(self):
        raise NotImplementedError("AdaptiveCache does not support offloading (Cache(offloading=True))")


class AdaptiveCache(Cache):
    """A transformers ``Cache`` storing K/V at mixed precision, per block, layer and KV head.

    Args:
        config: the model's config (``model.config`` itself: the cache reads the model's attention implementation
            from it to decide between handles and gathered tensors), the model, or None (default): then
            ``kvprec.enable(model)`` binds the cache to the model at its first forward (:meth:`bind`), and the
            checks that need the model (family, head_dim) run then.
        policy: a :class:`kvprec.policy.Policy` or a name for :func:`kvprec.policy.get` (default
            ``"sink_window"``: 4 sink tokens and the last 128 at FP16, the rest at INT4).
        block_size: positions per block, a power of two up to MAX_BLOCK_SIZE (1024). Each layer allocates one whole
            block of tail in the model dtype at its first update, so a generation shorter than a block holds more
            bytes than an FP16 cache of its tokens. group_size: value quantization group along head_dim, dividing
            it (None: ``formats.default_group_size(head_dim)``, 64 for head_dim 64 / 128 / 256, as QuantizedCache).
        shadow: None, or "cpu" to keep a host copy of each sealed block in the model dtype (exact crop,
            promotion possible; host memory, reported apart).
        evict_sliding: sliding-window layers release the blocks no later query can see (default, as
            DynamicCache's sliding layers do); False keeps every position.
        key_rotation: None (keys stored as given), "hadamard" (randomized Hadamard; head_dim a power of two) or
            "orthogonal" (random orthogonal; any head_dim): keys are stored rotated and queries rotated alike
            (kvprec/storage/rotation.py). Recommended whenever blocks go below INT4 (without it, the first INT2 block
            warns once); float tiers then no longer hold the model's keys bit for bit (one FP32 rotation and a
            rounding to the model dtype).
        value_rotation: None (values stored as given), "hadamard" or "orthogonal" (as key_rotation): values are
            stored as v S (each layer its own S, drawn apart from the keys' R) and the attention output is rotated
            back (o S S^T = o) once per call; float tiers then hold the values to one FP32 rotation and back.
        rotation_seed: seeds the rotations (each layer draws its own from (seed, layer index), keys and values
            apart).
        backend: attention over the buffer: "cpp" (the native kernel, block by block with ATen ops), "cuda" (the
            CUDA flash-decoding kernel reading the packed tiers; built with KVPREC_CUDA, fp16/bf16, head_dim
            64/128/256, block_size >= 16), "triton" (the Triton flash-decoding kernel; head_dim 64/128/256; needs a
            GPU, or TRITON_INTERPRET=1), "torch" (the pure-torch block-by-block reference, instrumented by
            ``read_counter``), or "auto": for CUDA tensors "cuda" where it is built and takes the inputs, else
            "triton" where installed and the head_dim fits, else "cpp" (warned: CPU kernels over device pages).
        offloading: not supported; True raises.

    Every argument is checked here (types included: ``block_size=64.0`` is refused, not truncated); what needs the
    model (group_size against head_dim, a budget the floor tier cannot meet at that geometry, the Triton kernel's
    head_dims) is checked here when the config is given, else at :meth:`bind`.
    """

    def __init__(self, config=None, policy="sink_window", block_size: int = 64, group_size: Optional[int] = None,
                 shadow: Optional[str] = None, backend: str = "auto", offloading: bool = False,
                 evict_sliding: bool = True, key_rotation: Optional[str] = None, rotation_seed: int = 0,
                 value_rotation: Optional[str] = None):
        if offloading:
            raise NotImplementedError("AdaptiveCache does not support offloading=True: its pages live in the "
                                      "buffer's tier pools; use shadow='cpu' for a host copy instead")
        config = None if config is None else as_config(config)
        if config is not None:
            check_supported(config)
        require_native("kvprec.AdaptiveCache")
        check_cache_arguments(block_size, group_size, shadow, backend, evict_sliding, rotation_seed)
        self.policy = get_policy(policy)
        self.block_size, self.shadow = block_size, shadow is not None
        #: None: each layer takes formats.default_group_size(head_dim) (layer.geometry.group_size)
        self.group_size = group_size
        self.backend = backend
        #: set to a kvprec.ops.reference.attention.ReadCounter to count block reads of the "torch" backend
        self.read_counter: Optional[ReadCounter] = None
        self._warned_slow = False
        self._warned_cpu_kernels = False
        self._warned_int2_keys = False
        self.evict_sliding = evict_sliding
        self.key_rotation, self.rotation_seed = check_kind(key_rotation), rotation_seed
        self.value_rotation = check_kind(value_rotation, "value_rotation")
        #: the model's text config (None until bound); _config_detached: a copy from unpickling, not the model's;
        #: _bound_to: what bind() was given (model.config, the model, or a config)
        self.config, self._config_detached, self._bound_to = None, False, None
        #: the layer the next update of a complete forward goes to (partial-forward detection, _check_forward)
        self._next_layer = 0
        super().__init__(layers=[])
        if config is not None:
            self.bind(config)

    # ---- the model the cache is for --------------------------------------------------------------------------
    def bind(self, config) -> None:
        """Tie the cache to a model's config (or the model): checks the family and the geometry, and makes the
        layers ``AdaptiveCache(config)`` would have. ``kvprec.enable(model)`` calls it at every forward of the model
        with this cache, so that a cache built without a config, or unpickled with a copy of it, reads the model's
        own config. Binding to a model of another shape (layer count, head_dim) raises."""
        if config is self._bound_to and not self._config_detached:  # every forward of an enabled model: O(1)
            return
        given, config = config, as_config(config)
        check_supported(config)
        head_dim = config_head_dim(config)
        if head_dim is not None:
            check_model_geometry(head_dim, self.block_size, self.group_size, self.key_rotation, self.backend,
                                 self.policy, value_rotation=self.value_rotation)
        n = config.num_hidden_layers
        held = {layer.buffer.head_dim for layer in self.layers if layer.buffer is not None}
        if (len(self.layers) > n or (self.config is not None and self.config.num_hidden_layers != n)
                or (head_dim is not None and held - {head_dim})):
            raise ValueError(f"AdaptiveCache: it holds {len(self.layers)} layers (head_dim {sorted(held) or '-'}), "
                             f"the {config.model_type} model {n} of head_dim {head_dim}; use one cache per model")
        if not self.layers:
            windows = sliding_windows(config) if self.evict_sliding else [0] * n
            self.layers.extend(AdaptiveLayer(self, i, w) for i, w in enumerate(windows))
        else:  # layers grown before binding (AdaptiveCache() run without kvprec.enable) keep their full attention
            self.layers.extend(AdaptiveLayer(self, i) for i in range(len(self.layers), n))
        self.config, self._config_detached, self._bound_to = config, False, given

    def attention_mismatch(self) -> Optional[str]:
        """None when the model runs kvprec's attention over this cache (updates return handles); else why not."""
        if self._config_detached:
            return ("the cache was unpickled with a copy of the model's config; kvprec.enable(model) binds it to the "
                    "model again at the next forward")
        return kvprec_attention_mismatch(self.config)

    def uses_kvprec_attention(self) -> bool:
        """Whether the model (through its config) runs the registered "kvprec" attention function."""
        return self.attention_mismatch() is None

    def attention_backend(self, q: torch.Tensor) -> str:
        """The backend that attends for queries ``q`` [B, Hq, Q, D] (see ``backend`` in the class docstring)."""
        if self.backend != "auto":
            return self.backend
        from .._native import cuda_kernels_available
        from ..ops import TRITON_DECODE_HEAD_DIMS, cuda_decode_fits

        if q.is_cuda and cuda_kernels_available() and cuda_decode_fits(q, self.block_size):
            return "cuda"
        if q.is_cuda and q.shape[-1] in TRITON_DECODE_HEAD_DIMS and importlib.util.find_spec("triton") is not None:
            return "triton"
        if q.is_cuda and not self._warned_cpu_kernels:
            if not cuda_kernels_available():
                self._warned_cpu_kernels = True
                warnings.warn("kvprec.AdaptiveCache: CUDA tensors, but neither the Triton kernel (head_dim "
                              f"{q.shape[-1]}; it takes {TRITON_DECODE_HEAD_DIMS}) nor the CUDA kernels (build with "
                              "KVPREC_CUDA=ON) can run here: blocks are dequantized on the CPU and copied back every "
                              "step (correct, slow)", stacklevel=2)
        return "cpp"

    def check_int2_keys(self, tiers: torch.Tensor) -> None:
        """Warn once when blocks go to INT2 with keys stored as given: 2-bit keys lose far more unrotated."""
        if self.key_rotation is None and not self._warned_int2_keys and bool((tiers == int(Tier.INT2)).any()):
            self._warned_int2_keys = True
            warnings.warn("kvprec.AdaptiveCache: blocks go to INT2 with keys stored as given; 2-bit keys lose far "
                          "more quality unrotated (uniform INT2 on examples/models/small_llama_stdlib: +20% "
                          "perplexity, +2.3% rotated): build the cache with key_rotation='orthogonal' or 'hadamard'",
                          Int2KeysWarning, stacklevel=4)

    def warn_slow_path(self, why: str) -> None:
        """Warn once that updates return gathered tensors (the slow path), saying ``why`` (attention_mismatch)."""
        if not self._warned_slow:
            self._warned_slow = True
            warnings.warn(f"kvprec.AdaptiveCache: the model is not using the 'kvprec' attention over the cache: {why}. "
                          "So every update gathers the whole cache back to the model dtype (correct but slow, and it "
                          "materialises full-precision K/V); call kvprec.enable(model)", stacklevel=4)

    # ---- updates, one forward at a time ---------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The model's entry point (``past_key_values.update(k, v, layer_idx)``): checks that the layers agree
        (:meth:`check_consistent`), then ``self.layers[layer_idx].update``. An unbound cache grows layers on demand,
        as ``DynamicCache()`` does."""
        while len(self.layers) <= layer_idx:
            self.layers.append(AdaptiveLayer(self, len(self.layers)))
        self._check_forward(layer_idx, key_states.shape[-2])
        self._next_layer = -1  # an update in progress: if it raises, the next forward compares the lengths
        out = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        self._next_layer = layer_idx + 1
        return out

    def _check_forward(self, layer_idx: int, n: int) -> None:
        """A forward updates layers 0, 1, ..., L-1 in order with the same n tokens. At layer 0 the previous forward
        must have finished (else the lengths are compared, O(L), and must agree); at layer i > 0, layer i must hold
        what layer 0 held before this forward (two host reads)."""
        if layer_idx == 0:
            if self._next_layer not in (0, len(self.layers)):
                self.check_consistent()
            return
        held, first = self.layers[layer_idx].get_seq_length(), self.layers[0].get_seq_length()
        if held == first - n:
            return
        if held == first:
            raise ValueError(f"AdaptiveCache.update(layer_idx={layer_idx}): layer 0 has not stored this forward's {n} "
                             "tokens yet; a forward updates layers 0, 1, 2, ... in order")
        self.check_consistent(forward_at=layer_idx)

    def check_consistent(self, forward_at: Optional[int] = None) -> None:
        """Raise :class:`PartialForwardError` if the layers hold different numbers of positions.

        forward_at: the layer a forward in progress has reached (the layers before it already hold its tokens), for
        the message."""
        lengths = [layer.get_seq_length() for layer in self.layers]
        if len(set(lengths)) <= 1 and forward_at is None:
            return
        now = (f" This forward has already stored its tokens in layers 0..{forward_at - 1} and is refused at layer "
               f"{forward_at}." if forward_at is not None else " Nothing of this forward was stored.")
        raise PartialForwardError(
            f"AdaptiveCache: its layers hold different numbers of positions {lengths}: a forward stopped part-way (an "
            "exception after some layers had stored its tokens), so the cache matches no prefix of the sequence."
            f"{now} Recover with cache.crop_to_shortest() (every layer back to {min(lengths)} positions, dropping "
            "what the failed forward added; exact for float tiers or with shadow='cpu', else the block it sealed "
            "returns to the tail dequantized), or cache.reset() to start over.")

    def crop_to_shortest(self) -> int:
        """Crop every layer to the shortest layer's length: undo what a forward that stopped part-way added (see
        :class:`PartialForwardError`). Returns that length."""
        shortest = min((layer.get_seq_length() for layer in self.layers), default=0)
        for layer in self.layers:
            if layer.get_seq_length() > shortest:
                layer.crop(shortest - layer.get_seq_length())
        self._next_layer = 0
        return shortest

    def reset(self) -> None:
        """Empty every layer (the cache can then be reused for a new sequence of the same model)."""
        super().reset()
        self._next_layer = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions of every layer; every layer is checked before any is
        cropped, so a refused crop (e.g. back past a sliding layer's evicted positions) leaves the cache as it was."""
        for layer in self.layers:
            layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    # ---- copies -----------------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> "AdaptiveCache":
        """An exact, independent copy (buffers included) that shares the model's config with this cache."""
        import copy

        for shared in (self.config, self._bound_to):  # the model's, not the cache's: the copy must follow the model
            if shared is not None:
                memo[id(shared)] = shared
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            setattr(clone, key, copy.deepcopy(value, memo))
        return clone

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bound_to": None}  # what bind() was given may be a whole model

    def __setstate__(self, state: dict) -> None:
        """Unpickling: the config is a copy, so the cache gathers tensors until it is bound to the model again."""
        self.__dict__.update(state)
        if self.config is not None:
            self._config_detached = True

    def memory_report(self) -> "CacheMemoryReport":
        return CacheMemoryReport.of(self)


@dataclass
class CacheMemoryReport:
    """Exact bytes of an AdaptiveCache, from each buffer's report.

    tier_bytes: int64 [L, n_tiers] live page bytes (K and V data + FP16 scales/zeros) per layer and tier;
    tail_bytes, table_bytes, rotation_bytes, shadow_bytes, elements, tokens, evicted_tokens, sealed_elements:
    int64 [L] (elements count the held positions, tokens minus evicted_tokens, which sliding-window layers dropped;
    sealed_elements those of held sealed blocks, the elements the pages store);
    precision_map: int64 [L, H_kv, n_tiers], sealed blocks per layer, KV head and tier (summed over batch rows);
    rotated: what ``rotation_bytes`` rotates, "key", "value", "key and value" or "" (for the text).
    Resident bytes = pages + tails + block tables + key and value rotation matrices (the shadow is host memory,
    reported apart).
    """

    policy: str
    tier_bytes: torch.Tensor
    tail_bytes: torch.Tensor
    table_bytes: torch.Tensor
    rotation_bytes: torch.Tensor
    shadow_bytes: torch.Tensor
    elements: torch.Tensor
    tokens: torch.Tensor
    evicted_tokens: torch.Tensor
    sealed_elements: torch.Tensor
    precision_map: torch.Tensor
    rotated: str = ""

    @classmethod
    def of(cls, cache: AdaptiveCache) -> "CacheMemoryReport":
        n_layers, n_tiers = len(cache.layers), len(Tier)
        heads = max((layer.tiers().shape[1] for layer in cache.layers), default=0)
        out = cls(cache.policy.describe(), torch.zeros(n_layers, n_tiers, dtype=torch.int64),
                  *(torch.zeros(n_layers, dtype=torch.int64) for _ in range(8)),
                  torch.zeros(n_layers, heads, n_tiers, dtype=torch.int64),
                  " and ".join(name for name, kind in (("key", cache.key_rotation), ("value", cache.value_rotation))
                               if kind is not None))
        for i, layer in enumerate(cache.layers):
            if layer.buffer is None:
                continue
            r = layer.memory()
            out.tier_bytes[i] = torch.tensor([r.tier_bytes[str(t)] for t in Tier], dtype=torch.int64)
            out.tail_bytes[i], out.table_bytes[i], out.shadow_bytes[i] = r.tail_bytes, r.table_bytes, r.shadow_bytes
            for matrix in (layer.rotation, layer.value_rotation):
                if matrix is not None:
                    out.rotation_bytes[i] += matrix.numel() * matrix.element_size()
            out.elements[i], out.tokens[i] = r.elements, r.tokens
            out.evicted_tokens[i] = layer.evicted_blocks * layer.block_size
            tiers = layer.tiers().to(torch.int64)
            if tiers.numel():
                held = (tiers >= 0).unsqueeze(-1)  # evicted blocks (tier -1) hold nothing
                counts = (torch.nn.functional.one_hot(tiers.clamp(min=0), n_tiers) * held).sum(dim=(0, 2))
                out.sealed_elements[i] = int(held.sum()) * layer.block_size * layer.buffer.head_dim * 2
                out.precision_map[i, :counts.shape[0]] = counts
        return out

    @property
    def resident_bytes_per_layer(self) -> torch.Tensor:
        return self.tier_bytes.sum(1) + self.tail_bytes + self.table_bytes + self.rotation_bytes

    @property
    def resident_bytes(self) -> int:
        return int(self.resident_bytes_per_layer.sum())

    @property
    def bits_per_element(self) -> float:
        """Resident bits per cached K/V element, metadata, tail and table included."""
        elements = int(self.elements.sum())
        return self.resident_bytes * 8 / elements if elements else 0.0

    @property
    def page_bits_per_element(self) -> float:
        """Bits per element of the held sealed blocks: page bytes (data, scales, zeros) * 8 / their elements. What a
        policy's tiers decide; the tail and the block table are left out (bits_per_element includes them)."""
        elements = int(self.sealed_elements.sum())
        return int(self.tier_bytes.sum()) * 8 / elements if elements else 0.0

    @property
    def compression_vs_fp16(self) -> float:
        """FP16 bytes of the same elements over resident bytes."""
        return int(self.elements.sum()) * 2 / self.resident_bytes if self.resident_bytes else 0.0

    def format(self) -> str:
        names = [str(t) for t in Tier]
        lines = [f"kvprec AdaptiveCache, policy {self.policy}: {len(self.tokens)} layers, "
                 f"{int(self.tokens.max()) if len(self.tokens) else 0} tokens"
                 + (f" (sliding-window layers evicted up to {int(self.evicted_tokens.max())} of them)"
                    if len(self.tokens) and int(self.evicted_tokens.max()) else ""),
                 f"{'layer':>5} " + " ".join(f"{n:>9}" for n in names)
                 + f" {'tail':>9} {'table':>7} {'resident':>10} {'bits/el':>7}"]
        for i in range(len(self.tokens)):
            el = int(self.elements[i])
            bits = int(self.resident_bytes_per_layer[i]) * 8 / el if el else 0.0
            lines.append(f"{i:>5} " + " ".join(f"{int(b):>9}" for b in self.tier_bytes[i])
                         + f" {int(self.tail_bytes[i]):>9} {int(self.table_bytes[i]):>7}"
                         f" {int(self.resident_bytes_per_layer[i]):>10} {bits:>7.2f}")
        lines.append(f"{'all':>5} " + " ".join(f"{int(b):>9}" for b in self.tier_bytes.sum(0))
                     + f" {int(self.tail_bytes.sum()):>9} {int(self.table_bytes.sum()):>7}"
                     f" {self.resident_bytes:>10} {self.bits_per_element:>7.2f}")
        rotation = int(self.rotation_bytes.sum())
        lines.append(f"effective {self.bits_per_element:.2f} bits/element (scales, zeros, tail, block table"
                     + (f" and {rotation} bytes of {self.rotated} rotations" if rotation else "")
                     + f" included; sealed pages alone {self.page_bits_per_element:.2f}), compression vs FP16 "
                     f"{self.compression_vs_fp16:.2f}x; host shadow {int(self.shadow_bytes.sum())} bytes")
        lines.append("precision map (sealed blocks per KV head, summed over batch rows):")
        for i in range(self.precision_map.shape[0]):
            heads = []
            for h in range(self.precision_map.shape[1]):
                counts = self.precision_map[i, h]
                heads.append(" ".join(f"{names[t]}={int(c)}" for t, c in enumerate(counts) if c) or "-")
            lines.append(f"  layer {i}: " + " | ".join(f"h{h} {s}" for h, s in enumerate(heads)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
