"""Capture: what a decoder's cache receives and what the model predicts, during generate or teacher forcing
(docs/design.md, "Capture").

    capture = Capture(CaptureSpec(layers=[0, 5], heads=[0], queries=True, block_mass=True, dtype="float16"))
    cache = capture.attach(AdaptiveCache(model.config, policy="uniform:fp32", block_size=16, evict_sliding=False))
    record = capture.generate(model, input_ids, cache, max_new_tokens=64, do_sample=False)
    # or: record = capture.teacher_force(model, input_ids, cache)

Recorded, per chosen layer and chosen KV heads (``heads``; the queries of the query heads that share them):

* keys, values: exactly what the cache's ``update`` receives (post-RoPE, before the cache rotates keys or
  quantizes anything), time-major float arrays [T, B, H, D] with their positions [T] (positions keep their
  numbering: a sliding layer's eviction does not renumber, a crop makes positions repeat, a beam reorder is not
  replayed; the record is the sequence of arrivals);
* queries (``queries=True``): the queries the "kvprec" attention function hands the layer (post-RoPE, before the
  cache's key rotation), [Tq, B, Hq, D] with their positions [Tq];
* block_mass (``block_mass=True``): per query, the attention probability that fell on each block of the layer (the
  unsealed tail is the last block), as the attention kernel emits it for policies (no second pass):
  [Tq, B, Hq, n_blocks] where n_blocks is the most any call saw; a row has NaN past the blocks of its call, and
  the queries of one multi-token call (prefill) report 0 on the blocks after their own position;
* per step, from the model's logits: the log-probability of the token that came next and the entropy
  ``H = -sum_v p_v log p_v`` (nats) of the next-token distribution, float64 [B, S]. In ``generate`` they come from a
  LogitsProcessor (:meth:`Capture.scorer`), which transformers runs before the sampling warpers (temperature, top-k,
  top-p), so they are the model's own distribution (after any processors the generation config itself adds, e.g. a
  repetition penalty); the chosen token is known one call later (or at :meth:`Capture.finish`). In teacher forcing
  they come from the forward's logits;
* the tokens [B, N] and the positions of the scored tokens (``scored_positions`` [S]: token ``tokens[:, p]`` has
  log-probability ``logprob[:, i]`` where ``p = scored_positions[i]``).

Memory stays bounded by choice: only the chosen layers and heads are kept, at ``dtype`` (float32, or float16: half
the bytes, ~3 significant digits), and with ``stream_dir`` every series spills to a raw file in that directory
whenever the capture holds more than ``memory_limit_mb`` in memory, read back as a read-only np.memmap. Beam search
is not supported (the log-probabilities pair each step with one row's next token).

The hooks are instance attributes on the cache's own layers (``update`` and ``attend`` wrapped), so nothing changes
for other caches, and a cache without :meth:`Capture.attach` costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class CaptureSpec:
    """What to record (module docstring). layers / heads: None = all (KV heads; their query heads follow)."""

    layers: Optional[Sequence[int]] = None
    heads: Optional[Sequence[int]] = None
    keys: bool = True
    values: bool = True
    queries: bool = False
    block_mass: bool = False
    dtype: str = "float32"
    stream_dir: Optional[str] = None
    memory_limit_mb: float = 64.0

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"CaptureSpec: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("layers", "heads"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                          for i in v) or not len(v):
                    raise ValueError(f"CaptureSpec: {name} must be None or a non-empty list of indices >= 0, got {v!r}")
                setattr(self, name, sorted(set(v)))
        if not (self.memory_limit_mb > 0):
            raise ValueError(f"CaptureSpec: memory_limit_mb must be > 0, got {self.memory_limit_mb}")


class Series:
    """Rows appended along axis 0 (fixed trailing shape, one dtype), kept in memory or spilled to a raw file."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.chunks: List[np.ndarray] = []
        self.trailing: Optional[tuple] = None
        self.rows = 0
        self.path: Optional[Path] = None
        self.spilled_rows = 0

    @property
    def memory_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if self.trailing is None:
            self.trailing = a.shape[1:]
        elif a.shape[1:] != self.trailing:
            raise ValueError(f"capture: rows of shape {a.shape[1:]} appended to a series of rows {self.trailing}")
        self.chunks.append(a)
        self.rows += len(a)

    def spill(self, path: Path) -> None:
        """Append the in-memory rows to the raw file ``path`` (C order) and drop them from memory."""
        if self.path is None:
            self.path = path
        with open(self.path, "ab") as f:
            for c in self.chunks:
                f.write(c.tobytes())
                self.spilled_rows += len(c)
        self.chunks = []

    def array(self) -> np.ndarray:
        """All rows [rows, *trailing]: an ndarray, or a read-only np.memmap once spilled."""
        trailing = self.trailing if self.trailing is not None else ()
        if self.path is not None:
            if self.chunks:
                self.spill(self.path)
            if self.rows == 0:
                return np.zeros((0, *trailing), self.dtype)
            return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.rows, *trailing))
        if not self.chunks:
            return np.zeros((0, *trailing), self.dtype)
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0]


@dataclass
class CaptureRecord:
    """What a capture recorded (module docstring). Per-layer dicts are keyed by layer index."""

    layers: List[int]
    heads: List[int]
    query_heads: List[int]
    keys: Dict[int, np.ndarray] = field(default_factory=dict)
    values: Dict[int, np.ndarray] = field(default_factory=dict)
    positions: Dict[int, np.ndarray] = field(default_factory=dict)
    queries: Dict[int, np.ndarray] = field(default_factory=dict)
    query_positions: Dict[int, np.ndarray] = field(default_factory=dict)
    _mass_values: Dict[int, np.ndarray] = field(default_factory=dict)
    _mass_blocks: Dict[int, np.ndarray] = field(default_factory=dict)
    tokens: Optional[np.ndarray] = None
    scored_positions: Optional[np.ndarray] = None
    logprob: Optional[np.ndarray] = None
    entropy: Optional[np.ndarray] = None
    _mass_rows: Dict[int, tuple] = field(default_factory=dict)   # (B, Hq_sel) of each layer's mass rows

    def block_mass(self, layer: int) -> np.ndarray:
        """[Tq, B, Hq, n_blocks_max] float32: per query row the mass on each block, NaN past its call's blocks."""
        values, blocks = self._mass_values[layer], self._mass_blocks[layer]
        tq = len(blocks)
        b, hq = self._mass_rows[layer]
        out = np.full((tq, b, hq, int(blocks.max()) if tq else 0), np.nan, dtype=np.float32)
        start = 0
        for i, n in enumerate(blocks.tolist()):
            size = b * hq * n
            out[i, :, :, :n] = values[start:start + size].reshape(b, hq, n)
            start += size
        return out

    @property
    def prompt_length(self) -> int:
        """Position of the first scored token (generate: the prompt's length; teacher forcing: 1)."""
        return int(self.scored_positions[0]) if self.scored_positions is not None and len(self.scored_positions) \
            else 0


def token_statistics(logits: torch.Tensor):
    """log-softmax [..., V] (float64) and entropy [...] in nats of ``logits`` [..., V]; p log p = 0 where p = 0."""
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return logp, entropy


class Capture:
    """Records what :meth:`attach`-ed caches receive and what the model predicts (module docstring)."""

    def __init__(self, spec: Optional[CaptureSpec] = None):
        self.spec = spec or CaptureSpec()
        self.np_dtype = DTYPES[self.spec.dtype]
        self._series: Dict[str, Series] = {}
        self._mass_rows: Dict[int, tuple] = {}
        self._layers: Optional[List[int]] = None
        self._heads: Optional[List[int]] = None
        self._query_heads: Optional[List[int]] = None
        self._logprob: List[torch.Tensor] = []
        self._entropy: List[torch.Tensor] = []
        self._pending: Optional[torch.Tensor] = None
        self._prompt_length: Optional[int] = None
        if self.spec.stream_dir is not None:
            Path(self.spec.stream_dir).mkdir(parents=True, exist_ok=True)

    # ---- hooks ------------------------------------------------------------------------------------------------
    def attach(self, cache):
        """Wrap the chosen layers of ``cache`` (a kvprec.AdaptiveCache) so that they record; returns the cache."""
        from ...hf.cache import AdaptiveCache

        if not isinstance(cache, AdaptiveCache):
            raise ValueError(f"Capture.attach: expected a kvprec AdaptiveCache, got {type(cache).__name__}")
        n = len(cache.layers)
        layers = list(range(n)) if self.spec.layers is None else list(self.spec.layers)
        if layers and layers[-1] >= n:
            raise ValueError(f"Capture: layers {self.spec.layers} out of range; the model has {n} layers")
        if self._layers is not None and self._layers != layers:
            raise ValueError("Capture.attach: another cache with other layers is attached already")
        self._layers = layers
        for i in layers:
            layer = cache.layers[i]
            layer.update = self._recording_update(layer, layer.update)
            layer.attend = self._recording_attend(layer, layer.attend)
        return cache

    def _heads_of(self, kv_heads: int) -> List[int]:
        if self._heads is None:
            heads = list(range(kv_heads)) if self.spec.heads is None else list(self.spec.heads)
            if heads[-1] >= kv_heads:
                raise ValueError(f"Capture: heads {self.spec.heads} out of range; the layers have {kv_heads} KV heads")
            self._heads = heads
        return self._heads

    def _recording_update(self, layer, update):
        def recording_update(key_states, value_states, *args, **kwargs):
            heads = self._heads_of(key_states.shape[1])
            start, n = layer.get_seq_length(), key_states.shape[-2]
            i = layer.layer_idx
            if self.spec.keys:
                self._append(f"keys.{i}", _time_major(key_states, heads))
            if self.spec.values:
                self._append(f"values.{i}", _time_major(value_states, heads))
            self._append(f"positions.{i}", np.arange(start, start + n, dtype=np.int64), np.int64)
            return update(key_states, value_states, *args, **kwargs)
        return recording_update

    def _recording_attend(self, layer, attend):
        def recording_attend(q, mask, scale, sliding_window, softcap, block_mass):
            want = self.spec.block_mass
            out, lse, mass = attend(q, mask, scale, sliding_window, softcap, block_mass or want)
            i, nq = layer.layer_idx, q.shape[2]
            qh = self._query_heads_of(q.shape[1], layer.buffer.kv_heads)
            end = layer.get_seq_length()
            if self.spec.queries or want:
                self._append(f"query_positions.{i}", np.arange(end - nq, end, dtype=np.int64), np.int64)
            if self.spec.queries:
                self._append(f"queries.{i}", _time_major(q, qh))
            if want:
                m = mass[:, qh].permute(2, 0, 1, 3).float().cpu().numpy()     # [Q, B, Hq_sel, n_blocks]
                self._mass_rows[i] = m.shape[1:3]
                self._append(f"mass_values.{i}", m.reshape(-1), np.float32)
                self._append(f"mass_blocks.{i}", np.full(nq, m.shape[-1], dtype=np.int64), np.int64)
            return out, lse, mass
        return recording_attend

    def _query_heads_of(self, hq: int, hkv: int) -> List[int]:
        if self._query_heads is None:
            g = hq // hkv
            self._query_heads = [h * g + j for h in self._heads_of(hkv) for j in range(g)]
        return self._query_heads

    def _append(self, name: str, a: np.ndarray, dtype=None) -> None:
        s = self._series.get(name)
        if s is None:
            s = self._series[name] = Series(dtype if dtype is not None else self.np_dtype)
        s.append(a)
        if self.spec.stream_dir is not None and \
                sum(x.memory_bytes for x in self._series.values()) > self.spec.memory_limit_mb * 2 ** 20:
            for key, series in self._series.items():
                series.spill(Path(self.spec.stream_dir) / f"{key}.{id(self):x}.bin")

    # ---- predictions ---------------------------------------------------------------------------------------------
    def scorer(self):
        """A transformers LogitsProcessor recording log-probability and entropy per generated step."""
        from transformers import LogitsProcessor

        capture = self

        class CaptureScorer(LogitsProcessor):
            def __call__(self, input_ids, scores):
                capture._on_scores(input_ids, scores)
                return scores
        return CaptureScorer()

    def _on_scores(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        if self._pending is not None:
            self._logprob.append(self._pending.gather(-1, input_ids[:, -1:].to(self._pending.device))[:, 0])
        logp, entropy = token_statistics(scores.detach())
        self._pending = logp
        self._entropy.append(entropy.cpu())

    def finish(self, output) -> CaptureRecord:
        """The record after ``model.generate`` (``output``: its sequences [B, N], or the dict it returns)."""
        sequences = getattr(output, "sequences", output)
        if self._prompt_length is None:
            raise ValueError("Capture.finish: the scorer saw no step; pass logits_processor=[capture.scorer()] to "
                             "generate (or use Capture.generate)")
        steps = len(self._entropy)
        if sequences.shape[1] != self._prompt_length + steps or sequences.shape[0] != self._entropy[0].shape[0]:
            raise ValueError(f"Capture.finish: sequences {tuple(sequences.shape)} do not match {steps} scored steps "
                             f"after a prompt of {self._prompt_length} (beam search is not supported)")
        self._logprob.append(self._pending.gather(-1, sequences[:, -1:].to(self._pending.device))[:, 0])
        self._pending = None
        logprob = torch.stack([x.cpu() for x in self._logprob], 1).numpy()
        entropy = torch.stack(self._entropy, 1).numpy()
        positions = np.arange(self._prompt_length, self._prompt_length + steps, dtype=np.int64)
        return self._record(sequences.cpu().numpy().astype(np.int64), positions, logprob, entropy)

    def generate(self, model, input_ids: torch.Tensor, cache, **generate_kwargs) -> CaptureRecord:
        """``model.generate`` through ``cache`` (attached here if it is not yet) under the "kvprec" attention, with
        the scorer; returns the record."""
        from ...hf.attention import enabled

        if self._layers is None:
            self.attach(cache)
        processors = list(generate_kwargs.pop("logits_processor", None) or []) + [self.scorer()]
        if generate_kwargs.get("num_beams", 1) != 1:
            raise ValueError("Capture.generate: beam search is not supported (num_beams must be 1)")
        with torch.no_grad(), enabled(model):
            out = model.generate(input_ids.to(model.device), past_key_values=cache, logits_processor=processors,
                                 **generate_kwargs)
        return self.finish(out)

    def teacher_force(self, model, input_ids: torch.Tensor, cache, chunk: Optional[int] = None) -> CaptureRecord:
        """Feed ``input_ids`` [B, N] through ``cache`` (attached here if it is not yet) in chunks of ``chunk``
        tokens (None: one forward); every position's log-probability of the next token and entropy."""
        from ...hf.attention import enabled

        if self._layers is None:
            self.attach(cache)
        ids = input_ids.to(model.device)
        n = ids.shape[1]
        step = n if chunk is None else int(chunk)
        if step < 1:
            raise ValueError(f"Capture.teacher_force: chunk must be >= 1, got {chunk}")
        logprob, entropy = [], []
        with torch.no_grad(), enabled(model):
            for start in range(0, n, step):
                logits = model(input_ids=ids[:, start:start + step], past_key_values=cache, use_cache=True).logits
                logp, ent = token_statistics(logits)
                targets = ids[:, start + 1:start + step + 1]
                k = targets.shape[1]  # the last position of the sequence has no target
                logprob.append(logp[:, :k].gather(-1, targets[..., None])[..., 0].cpu())
                entropy.append(ent[:, :k].cpu())
        return self._record(ids.cpu().numpy().astype(np.int64), np.arange(1, n, dtype=np.int64),
                            torch.cat(logprob, 1).numpy(), torch.cat(entropy, 1).numpy())

    def _record(self, tokens, scored, logprob, entropy) -> CaptureRecord:
        layers = self._layers or []
        rec = CaptureRecord(layers, list(self._heads or []), list(self._query_heads or []), tokens=tokens,
                            scored_positions=scored, logprob=logprob, entropy=entropy)
        for i in layers:
            for attr, name in (("keys", "keys"), ("values", "values"), ("positions", "positions"),
                               ("queries", "queries"), ("query_positions", "query_positions"),
                               ("_mass_values", "mass_values"), ("_mass_blocks", "mass_blocks")):
                s = self._series.get(f"{name}.{i}")
                if s is not None:
                    getattr(rec, attr)[i] = s.array()
        rec._mass_rows = dict(self._mass_rows)
        return rec


def _time_major(x: torch.Tensor, heads: Sequence[int]) -> np.ndarray:
    """[B, H, n, D] -> the chosen heads as [n, B, len(heads), D] (float32 on the host; cast by Series)."""
    return x[:, list(heads)].permute(2, 0, 1, 3).detach().float().cpu().numpy()

