"""Key and value rotation: store every key (and optionally every value) multiplied by a fixed orthogonal matrix, so
low-bit codes keep more of their quality.

For an orthogonal R [D, D] (R R^T = I) and k' = k R, q' = q R:

    q' . k' = q R R^T k^T = q . k

so attention over rotated keys with rotated queries gives the same scores, the same softmax and the same output
(values are not rotated). What changes is what the quantizer sees: a rotation spreads each key's energy over all
channels, so the per-channel ranges within a block become alike and a few large channels no longer set the step
of the others. On the small model we trained (examples/models/small_llama_stdlib.safetensors), uniform INT2 went
from +20.2% to +2.3% perplexity ("orthogonal"; +2.8% "hadamard") with rotated keys, values untouched
(examples/quality_vs_bits.py, 4096 teacher-forced predictions at 512..1024 positions of context).
QuaRot (arXiv:2404.00456) and QuIP# (arXiv:2402.04396) use the same identity for weights and activations.

Values: for v' = v S (S orthogonal, its own matrix), attention over v' gives o' = softmax(.) V S = o S, so the
output is rotated back once per call, o = o' S^T: the cost is one [Q, D] x [D, D] product per head and call,
whatever the context length. Values are quantized per token in groups along head_dim, so S spreads a token's few
large channels over the group, as R does for a key block's channels. Measured on SmolLM2-135M (docs/quality.md,
"Value rotation and sensitivity-based allocation"): it lowers the perplexity change of rows with INT2 blocks (a
quarter of the blocks at INT4, the rest INT2: +8.84% -> +3.82% on code) and raises uniform INT4's (+0.13% ->
+2.99%), so it is worth it below 4 bits only.

Kinds:

* ``"hadamard"``: R = diag(s) H_D / sqrt(D), H_D the Sylvester Hadamard matrix, s random signs (head_dim a power of
  two). The randomized Hadamard transform of QuaRot.
* ``"orthogonal"``: R = Q diag(sign(diag(Rqr))) from the QR decomposition of a Gaussian D x D matrix (Haar
  distributed; any head_dim).

Both are drawn from a ``torch.Generator`` seeded by (seed, layer index, keys or values): a cache is reproducible,
and its layers (and a layer's keys and values) use different rotations. The matrix is FP32 on the cache's device
(D^2 * 4 bytes per layer, counted in the memory report). Queries are rotated in FP32 and cast back to the model
dtype before the attention kernel reads them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

KINDS = ("hadamard", "orthogonal")


#: what each stored tensor's rotations are drawn for: its offset in the generator's seed (see rotation_matrix)
STREAMS = {"keys": 0, "values": 500_000}


def check_kind(kind: Optional[str], argument: str = "key_rotation") -> Optional[str]:
    """None or one of KINDS; raises ValueError naming ``argument`` and what is accepted."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{argument}: {kind!r} is not accepted; use None, {', '.join(repr(k) for k in KINDS)}")
    return kind


def sylvester_hadamard(d: int, argument: str = "key_rotation") -> torch.Tensor:
    """The Sylvester Hadamard matrix H_d (entries +-1, H H^T = d I), FP32 [d, d]; d a power of two."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"{argument}='hadamard': head_dim {d} is not a power of two; use "
                         f"{argument}='orthogonal', which takes any head_dim")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(kind: str, head_dim: int, seed: int = 0, layer_idx: int = 0, stream: str = "keys") -> torch.Tensor:
    """An orthogonal FP32 [head_dim, head_dim] matrix R of ``kind`` (module docstring); keys (``stream="keys"``) or
    values (``"values"``) are stored as x R. The generator's seed is seed * 1,000,003 + layer_idx + STREAMS[stream]:
    the keys' matrices are those of a cache without value rotation, and no two (seed, layer, stream) share a seed
    below 500,000 layers."""
    if stream not in STREAMS:
        raise ValueError(f"rotation_matrix: stream {stream!r} is not accepted; use {', '.join(map(repr, STREAMS))}")
    argument = "value_rotation" if stream == "values" else "key_rotation"
    check_kind(kind, argument)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer_idx) + STREAMS[stream])
    if kind == "hadamard":
        h = sylvester_hadamard(head_dim, argument)
        signs = torch.randint(0, 2, (head_dim,), generator=generator, dtype=torch.float32) * 2 - 1
        return signs[:, None] * h / math.sqrt(head_dim)
    gauss = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ rotation [D, D], computed in FP32, returned in x's dtype. (One product when x is FP32 already: the
    call sits on every decode step of every layer, twice.)"""
    if x.dtype == torch.float32:
        return x @ rotation
    return (x.float() @ rotation).to(x.dtype)


def unrotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ rotation^T: the inverse of :func:`rotate` (up to rounding), in x's dtype."""
    return rotate(x, rotation.T)
