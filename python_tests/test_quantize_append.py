"""quantize_append: whole blocks quantized straight into the pages of a pool, every backend against the oracle
(kvprec.ops.reference.quantize.quantize_keys / quantize_values of the live blocks, then index writes into a copy of the pool),
bit for bit; the fused range check (amax); bad arguments; and the buffer's seal path built on it.

Backends: "torch" (the reference, on the test device), "cpp" (CPU kernel), "triton" (Triton's interpreter on CPU,
TRITON_INTERPRET=1 set by triton_device before triton is imported; compiled where a GPU exists), "cuda" (where built and a
GPU exists). Pools start as random bytes with spare pages and the blocks land on a random page order with one
block skipped (page -1), so a kernel that ignores the indirection, writes outside its pages or reads a skipped
block fails. Tolerance: none (docs/design.md, "Tests": quantizers are bit-exact).
"""
from triton_device import DEVICE, TRITON  # first: sets TRITON_INTERPRET without CUDA

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kvprec  # noqa: E402
from kvprec import MixedPrecisionBuffer, ops  # noqa: E402
from kvprec.ops.reference import quantize as quantize_ref
from kvprec.storage.formats import Tier  # noqa: E402
from kvprec.ops.reference import PagedKV  # noqa: E402

from helpers import awkward_blocks, same_bits  # noqa: E402
from triton_sm90 import run_compile_script  # noqa: E402

NATIVE = kvprec.native_available()
BACKENDS = (["torch"] + (["cpp"] if NATIVE else []) + (["triton"] if TRITON else [])
            + (["cuda"] if kvprec.cuda_kernels_available() else []))
BACKEND_DEVICE = {"torch": DEVICE, "cpp": "cpu", "triton": DEVICE, "cuda": "cuda"}
native = pytest.mark.skipif(not NATIVE, reason="native library not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_pool(tier, p, t, d, keys, group_size, device, seed=0):
    """A pool of p pages filled with random bytes (integer tiers) / random values (float tiers)."""
    gen = torch.Generator().manual_seed(seed)
    if not tier.is_integer:
        return (torch.randn(p, t, d, generator=gen).to(tier.float_dtype).to(device), None, None)
    meta = (p, d) if keys else (p, t, d // group_size)
    codes = torch.randint(0, 256, (p, t, d * tier.bits // 8), generator=gen, dtype=torch.uint8)
    return (codes.to(device), torch.randn(meta, generator=gen).half().to(device),
            torch.randn(meta, generator=gen).half().to(device))


def random_pages(lead, spare, seed, skip=True):
    """Distinct pages in a random order for blocks of shape ``lead``, one block skipped (-1); pool size."""
    n = 1
    for s in lead:
        n *= s
    p = n + spare
    pages = torch.randperm(p, generator=torch.Generator().manual_seed(seed))[:n].clone()
    if skip and n >= 3:
        pages[n // 2] = -1
    return pages.reshape(lead), p


def oracle(x, tier, pages, pool, keys, group_size):
    """quantize_ref.quantize_keys / quantize_values of the blocks with a page, then index writes into a copy."""
    codes, scale, zero = (None if a is None else a.clone().cpu() for a in pool)
    t, d = x.shape[-2:]
    x3 = x.reshape(-1, t, d).cpu()
    p = pages.reshape(-1).long().cpu()
    live = (p >= 0).nonzero().flatten()
    amax = torch.zeros(1)
    if live.numel():
        q = quantize_ref.quantize_keys(x3[live], tier) if keys else quantize_ref.quantize_values(x3[live], tier, group_size)
        codes[p[live]] = q.codes
        if tier.is_integer:
            scale[p[live]] = q.scale
            zero[p[live]] = q.zero
        amax = x3[live].abs().amax().float().reshape(1)
    return (codes, scale, zero), amax


def run(backend, x, tier, pages, pool, keys, group_size, amax=None, check=True):
    """ops.quantize_append on copies of the pool, on the backend's device; returns (pool, amax) on the host."""
    dev = BACKEND_DEVICE[backend]
    codes, scale, zero = (None if a is None else a.clone().to(dev) for a in pool)
    amax = ops.quantize_append(x.to(dev), tier, pages, codes, scale, zero, keys=keys, group_size=group_size,
                               amax=None if amax is None else amax.to(dev), check=check, backend=backend)
    return tuple(None if a is None else a.cpu() for a in (codes, scale, zero)), amax.cpu()


def assert_same_pool(got, want, what):
    for name, a, b in zip(("codes", "scale", "zero"), got, want):
        assert (a is None and b is None) or same_bits(a, b), f"{what}: {name}"


# ------------------------------------------------------------------------------------------------------------
# Bit for bit against quantize_* + index writes

GEOMETRIES = [(16, 64, 32), (64, 128, 32), (16, 80, 16), (64, 80, 20)]  # T, D, G: D = 80 and G = 20 are awkward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tier", list(Tier), ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "t{}-d{}-g{}".format(*g))
@pytest.mark.parametrize("backend", BACKENDS)
def test_pages_match_quantize_then_index_writes(backend, geom, tier, dtype):
    t, d, g = geom
    for keys in (True, False):
        x = awkward_blocks(6, t, d, dtype, seed=t + d + int(tier)).reshape(2, 3, t, d)
        pages, p = random_pages((2, 3), spare=3, seed=d + int(keys))
        pool = make_pool(tier, p, t, d, keys, g, "cpu", seed=int(tier))
        want, want_amax = oracle(x, tier, pages, pool, keys, g)
        got, amax = run(backend, x, tier, pages, pool, keys, g)
        assert_same_pool(got, want, f"{backend} {'keys' if keys else 'values'}")
        assert same_bits(amax, want_amax)


@pytest.mark.parametrize("tier", [Tier.INT4, Tier.INT2, Tier.FP16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_are_read_in_place(backend, tier):
    """The buffer's layouts: blocks of a [B, n, H, D] tensor seen as [B, H, n, D] (what Hugging Face hands over),
    split into [B, H, NB, T, D] (three leading dims); a 3-D input with a non-unit channel stride."""
    b, h, t, d, g, nb = 2, 3, 16, 64, 32, 3
    dev = BACKEND_DEVICE[backend]
    base = awkward_blocks(b * nb, t * h, d, torch.float16, seed=5).reshape(b, nb * t, h, d)
    x = base.to(dev).transpose(1, 2).narrow(2, 0, nb * t).unflatten(2, (nb, t))  # [B, H, NB, T, D], strided
    assert not x.is_contiguous()
    pages, p = random_pages((b, h, nb), spare=2, seed=1)
    for keys in (True, False):
        pool = make_pool(tier, p, t, d, keys, g, "cpu")
        want, want_amax = oracle(x.contiguous(), tier, pages, pool, keys, g)
        got, amax = run(backend, x, tier, pages, pool, keys, g)
        assert_same_pool(got, want, f"5-D strided {'keys' if keys else 'values'}")
        assert same_bits(amax, want_amax)
    wide = awkward_blocks(4, t, 2 * d, torch.float32, seed=6).to(dev)[:, :, ::2]  # channel stride 2
    pages, p = random_pages((4,), spare=1, seed=2)
    pool = make_pool(tier, p, t, d, True, g, "cpu")
    want, _ = oracle(wide.contiguous(), tier, pages, pool, True, g)
    got, _ = run(backend, wide, tier, pages, pool, True, g)
    assert_same_pool(got, want, "channel stride 2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_pages_long_block_and_nothing_to_write(backend):
    x = awkward_blocks(2, 256, 128, torch.float16, seed=7)
    pages = torch.tensor([3, 0], dtype=torch.int32)
    for keys in (True, False):
        pool = make_pool(Tier.INT4, 5, 256, 128, keys, 32, "cpu")
        want, _ = oracle(x, Tier.INT4, pages, pool, keys, 32)
        got, _ = run(backend, x, Tier.INT4, pages, pool, keys, 32)
        assert_same_pool(got, want, "T = 256")
    pool = make_pool(Tier.INT8, 3, 256, 128, True, 32, "cpu")
    got, amax = run(backend, x * float("nan"), Tier.INT8, torch.tensor([-1, -1]), pool, True, 32)
    assert_same_pool(got, pool, "every block skipped")
    assert amax.item() == 0.0  # skipped blocks are not read


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's bf16 -> fp16 cast overflows to inf, as meant
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_fp16_and_bf16_bit_pattern_converts_as_torch(backend):
    """Float tiers store x cast to the tier dtype; the CPU kernel converts FP16 on the bit patterns (a loop that
    vectorizes) and the GPU kernels with the hardware: every non-NaN pattern, both directions (NaN payloads are not
    part of the format)."""
    for dtype, tiers in ((torch.float16, (Tier.FP32, Tier.BF16)), (torch.bfloat16, (Tier.FP32, Tier.FP16))):
        bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
        x = bits.view(dtype)
        keep = ~x.isnan()
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16:
            # Triton's interpreter (numpy) turns BF16 subnormals into wrong FP32 values; a GPU converts them exactly
            keep &= (x.float().abs() >= torch.finfo(torch.float32).tiny) | (x == 0)
        x = x[keep]
        x = torch.cat([x, torch.zeros(64 * 16 * 64 - x.numel(), dtype=dtype)]).reshape(64, 16, 64)
        pages, p = random_pages((64,), spare=1, seed=3, skip=False)
        for tier in tiers:
            pool = make_pool(tier, p, 16, 64, True, 32, "cpu")
            want = pool[0].clone()
            want[pages] = x.to(tier.float_dtype)  # the cast itself (bf16 -> fp16 overflows to inf, as torch does)
            got, amax = run(backend, x, tier, pages, pool, True, 32, check=False)
            assert same_bits(got[0], want), f"{dtype} -> {tier}"
            assert amax.item() == x.float().abs().max().item()


_COMPILE_SCRIPT = r"""
import torch
from triton_sm90 import compile_sm90, record_launches
import kvprec.ops.triton.quantize_append as tqa
from kvprec.storage.formats import Tier

launches = record_launches(tqa)

def pool(tier, p, t, d, keys, g):
    if not tier.is_integer:
        return torch.empty(p, t, d, dtype=tier.float_dtype), None, None
    meta = (p, d) if keys else (p, t, d // g)
    return (torch.empty(p, t, d * tier.bits // 8, dtype=torch.uint8), torch.empty(meta, dtype=torch.float16),
            torch.empty(meta, dtype=torch.float16))

amax = torch.zeros(1)
for dtype, t, d, g, tier, keys in ((torch.float16, 64, 128, 32, Tier.INT4, True),    # keys
                                   (torch.float16, 64, 128, 32, Tier.INT2, False),   # values, [T, D/G, G] view
                                   (torch.bfloat16, 16, 80, 20, Tier.INT8, False),   # values, group by group
                                   (torch.float32, 64, 128, 32, Tier.BF16, True),    # float tier
                                   (torch.float32, 16, 64, 32, Tier.FP16, True)):
    x = torch.randn(1, 2, 3, t, d).to(dtype)
    tqa.quantize_append_op(x, torch.arange(6).reshape(1, 2, 3), *pool(tier, 6, t, d, keys, g), amax, int(tier),
                           keys, g)
for (kernel, args, kw), tier in zip(launches, ("int4", "int2", "int8", "bf16", "fp16")):
    ptx = compile_sm90(kernel, args, kw).asm["ptx"]
    if tier.startswith("int"):
        assert "div.rn.f32" in ptx and "div.full.f32" not in ptx, "quantize must divide with IEEE rounding"
    assert "atom.global" in ptx, "amax is raised with an atomic max"
print("OK", len(launches))
"""


@pytest.mark.skipif(not TRITON, reason="needs triton")
def test_triton_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter does not run the compiler (layouts, reshapes, constexpr rules): compile the launches of the
    three integer paths and two float tiers for sm_90 with the installed triton and its bundled ptxas, and check
    the PTX for the IEEE division the format needs."""
    pytest.importorskip("triton.backends.nvidia")
    out = run_compile_script(_COMPILE_SCRIPT)
    assert out.returncode == 0 and "OK 5" in out.stdout, out.stderr[-4000:]


# ------------------------------------------------------------------------------------------------------------
# The fused range check

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter (numpy) on deliberate inf / NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_amax_accumulates_propagates_nan_and_ignores_skipped_blocks(backend):
    dev = BACKEND_DEVICE[backend]
    t, d = 16, 64
    pool = make_pool(Tier.INT4, 4, t, d, True, 32, dev)
    x = torch.randn(3, t, d)
    x[1] *= 100  # the largest block
    pages = torch.tensor([0, 2, 1])
    amax = ops.quantize_append(x.to(dev), "int4", pages, *pool, keys=True, backend=backend)
    assert amax.item() == x.abs().max().item()
    pool_v = make_pool(Tier.INT4, 4, t, d, False, 32, dev)
    small = torch.randn(3, t, d)
    assert ops.quantize_append(small.to(dev), "int4", pages, *pool_v, keys=False, amax=amax,
                               backend=backend) is amax
    assert amax.item() == x.abs().max().item()  # raised, never lowered
    skipped = x.clone()
    skipped[1] = float("inf")
    amax = ops.quantize_append(skipped.to(dev), "int4", torch.tensor([0, -1, 1]), *pool, keys=True, backend=backend)
    assert amax.item() == torch.cat([x[0], x[2]]).abs().max().item()  # the skipped block is not read
    for bad, want in ((float("inf"), float("inf")), (float("nan"), None), (-1e5, 1e5)):
        y = x.clone()
        y[2, 3, 4] = bad
        amax = ops.quantize_append(y.to(dev), "int8", pages, *make_pool(Tier.INT8, 4, t, d, True, 32, dev),
                                   keys=True, check=False, backend=backend)
        assert amax.isnan().item() if want is None else amax.item() == want


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter (numpy) on deliberate inf / NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_raises_naming_x(backend):
    dev = BACKEND_DEVICE[backend]
    t, d = 16, 32
    x = torch.randn(2, t, d)
    pages = torch.tensor([1, 0])
    with pytest.raises(ValueError, match=r"quantize_append: x: integer tiers .* \|x\| <= 65504; got max \|x\| = "):
        ops.quantize_append((x * 1e5).to(dev), "int4", pages, *make_pool(Tier.INT4, 2, t, d, False, 8, dev),
                            keys=False, group_size=8, backend=backend)
    with pytest.raises(ValueError, match="finite"):
        ops.quantize_append(torch.full((2, t, d), float("nan")).to(dev), "int2", pages,
                            *make_pool(Tier.INT2, 2, t, d, True, 8, dev), keys=True, backend=backend)
    # fp16 storage of a wider dtype refuses what would become inf, after storing exactly what a cast stores
    big = x.clone()
    big[0, 0, 0] = 1e6
    codes = make_pool(Tier.FP16, 2, t, d, True, 8, dev)[0]
    with pytest.raises(ValueError, match="the fp16 tier holds"):
        ops.quantize_append(big.to(dev), "fp16", pages, codes, keys=True, backend=backend)
    assert same_bits(codes[pages].cpu(), big.half())
    for tier, y in (("bf16", big), ("fp32", big), ("fp16", big.half())):  # these tiers store any such value
        ops.quantize_append(y.to(dev), tier, pages, make_pool(Tier.parse(tier), 2, t, d, True, 8, dev)[0], keys=True,
                            backend=backend)
    amax = ops.quantize_append((x * 1e5).to(dev), "int8", pages, *make_pool(Tier.INT8, 2, t, d, True, 8, dev),
                               keys=True, check=False, backend=backend)
    assert amax.item() == (x * 1e5).abs().max().item()


# ------------------------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument, from every backend

def _bad_calls():
    t, d = 4, 8
    x = torch.randn(3, t, d)
    pages = torch.tensor([2, 0, 1])
    ck, sk, zk = make_pool(Tier.INT4, 3, t, d, True, 4, "cpu")
    cv, sv, zv = make_pool(Tier.INT4, 3, t, d, False, 4, "cpu")
    f16 = make_pool(Tier.FP16, 3, t, d, True, 4, "cpu")[0]
    k = dict(keys=True)
    v = dict(keys=False, group_size=4)
    return [
        ((x[0], "int4", pages[0], ck, sk, zk), k, r"x must be a \[\.\.\., T, D\] tensor with 1 to 3 leading dims"),
        ((x.int(), "int4", pages, ck, sk, zk), k, "x has dtype"),
        ((x, "int4", pages[:2], ck, sk, zk), k, r"pages must be int32 or int64 with shape x.shape\[:-2\] = \[3\]"),
        ((x, "int4", pages.float(), ck, sk, zk), k, "pages must be int32 or int64"),
        ((x, "int4", torch.tensor([2, 9, 1]), ck, sk, zk), k,
         r"pages\[1\] \(flat index\) = 9 is out of range; the pool holds 3 pages"),
        ((x, "int4", pages, ck.int(), sk, zk), k, r"codes must be a contiguous .*\[P, 4, 4\] for int4"),
        ((x, "int2", pages, ck, sk, zk), k, r"codes must be a contiguous .*\[P, 4, 2\] for int2"),
        ((x, "int4", pages, ck, None, zk), k, r"scale must be a contiguous float16 \[3, 8\]"),
        ((x, "int4", pages, ck, sv, zk), k, r"scale must be a contiguous float16 \[3, 8\]"),
        ((x, "int4", pages, cv, sv, zv.float()), v, r"zero must be a contiguous float16 \[3, 4, 2\]"),
        ((x, "int4", pages, cv, sv, zv), dict(keys=False, group_size=3), "group_size 3 must divide head_dim 8"),
        ((x, "fp16", pages, f16, sk, None), k, "scale must be None"),
        ((x, "fp16", pages, ck, None, None), k, r"codes must be a contiguous .*\[P, 4, 8\] for fp16"),
        ((x, "int4", pages, ck, sk, zk), dict(keys=True, amax=torch.zeros(1, dtype=torch.float64)),
         "amax must be a float32 tensor of one element"),
        ((x, "int3", pages, ck, sk, zk), k, "tier: 'int3' is not a tier"),
    ]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if BACKEND_DEVICE[b] == "cpu"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_name_the_argument(backend, case):
    args, kw, match = _bad_calls()[case]
    before = [None if a is None or not isinstance(a, torch.Tensor) else a.clone() for a in args]
    with pytest.raises(ValueError, match=match):
        ops.quantize_append(*args, **kw, backend=backend)
    for a, b in zip(args, before):  # refused before anything was written
        assert b is None or torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="device-held pages need a GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if BACKEND_DEVICE[b] == "cuda"])
def test_device_pages_out_of_range_are_skipped_then_reported(backend):
    pool = make_pool(Tier.INT4, 2, 16, 64, True, 32, "cuda")
    before = [a.clone() for a in pool]
    with pytest.raises(ValueError, match="pages holds 7, out of range; the pool holds 2 pages"):
        ops.quantize_append(torch.randn(1, 16, 64, device="cuda"), "int4", torch.tensor([7], device="cuda"), *pool,
                            keys=True, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(pool, before))


# ------------------------------------------------------------------------------------------------------------
# Registry

def test_auto_backend_and_registry():
    assert ops.resolve_backend("quantize_append", "auto", torch.device("cpu")) == "torch"
    assert ops.REGISTRY["quantize_append"].native == "kvprec::quantize_append"
    with pytest.raises(ValueError, match="backend: 'fast' is not accepted"):
        ops.quantize_append(torch.zeros(1, 4, 8), "int8", torch.tensor([0]),
                            *make_pool(Tier.INT8, 1, 4, 8, True, 8, "cpu"), keys=True, backend="fast")


@native
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if kvprec.cuda_kernels_available() else []))
@pytest.mark.parametrize("tier, keys", [(Tier.INT4, True), (Tier.INT2, False), (Tier.BF16, True)], ids=str)
def test_native_opcheck(device, tier, keys):
    t, d, g = 8, 16, 8
    x = torch.randn(2, 3, t, d, device=device, dtype=torch.float16)
    pages, p = random_pages((2, 3), spare=2, seed=3)
    codes, scale, zero = make_pool(tier, p, t, d, keys, g, device)
    amax = torch.zeros(1, device=device)
    torch.library.opcheck(torch.ops.kvprec.quantize_append.default,
                          (x, pages.to(device), codes, scale, zero, amax, int(tier), keys, g))


@pytest.mark.skipif(DEVICE != "cuda" or not TRITON, reason="the interpreter cannot trace fake tensors")
def test_triton_opcheck():
    from kvprec.ops.triton import quantize_append as tqa

    x = torch.randn(2, 16, 64, device="cuda", dtype=torch.float16)
    codes, scale, zero = make_pool(Tier.INT4, 3, 16, 64, False, 32, "cuda")
    torch.library.opcheck(torch.ops.kvprec_triton.quantize_append.default,
                          (x, torch.tensor([2, 0], device="cuda"), codes, scale, zero,
                           torch.zeros(1, device="cuda"), int(Tier.INT4), False, 32))
    assert tqa.quantize_append_op is not None


# ------------------------------------------------------------------------------------------------------------
# The buffer seals through quantize_append

def _state(buf):
    m = buf.memory()
    pools = {t: [None if a is None else a.clone() for a in buf.pool(t)] for t in Tier if buf.pool(t).k is not None}
    return (buf.seq_len, buf.tiers(), buf.pages(), buf.tail_keys().clone(), buf.tail_values().clone(),
            m.reserved_bytes, dict(m.tier_pages), {t: p[0].shape[0] for t, p in pools.items()})


def _same_state(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


@native
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if kvprec.cuda_kernels_available() else []))
def test_buffer_layouts_and_chunks_give_the_same_pages(device):
    """Hugging Face's [B, n, H, D].transpose(1, 2) layout, appended in chunks that seal through the tail and
    straight from the input, gives the pages of one contiguous append; the shadow holds the input blocks."""
    b, h, d, t, n = 2, 3, 64, 16, 150
    g = torch.Generator().manual_seed(9)
    k = torch.randn(b, n, h, d, generator=g).half().to(device).transpose(1, 2)
    v = torch.randn(b, n, h, d, generator=g).half().to(device).transpose(1, 2)
    tiers = torch.tensor([int(x) for x in (Tier.INT8, Tier.INT4, Tier.INT2, Tier.FP16, Tier.FP32, Tier.BF16)],
                         dtype=torch.int8)[torch.randint(0, 6, (b, h, n // t), generator=g)]
    one = MixedPrecisionBuffer(b, h, d, t, 32, torch.float16, device, shadow=True)
    one.append(k.contiguous(), v.contiguous(), tiers)
    chunked = MixedPrecisionBuffer(b, h, d, t, 32, torch.float16, device, shadow=True)
    pos = 0
    for c in (5, 40, 1, 70, 34):
        s = chunked.blocks_sealed_by(c)
        first = chunked.num_sealed_blocks
        chunked.append(k[:, :, pos:pos + c], v[:, :, pos:pos + c], tiers[:, :, first:first + s])
        pos += c
    assert pos == n and torch.equal(one.tiers(), chunked.tiers())
    for j in range(n // t):
        assert all(torch.equal(x, y) for x, y in zip(one.block(j), chunked.block(j)))
        assert torch.equal(chunked.block(j, torch.float32)[0].cpu()[tiers[:, :, j] == int(Tier.FP32)],
                           k[:, :, j * t:(j + 1) * t].float().cpu()[tiers[:, :, j] == int(Tier.FP32)])
    assert torch.equal(chunked.tail_keys(), k[:, :, (n // t) * t:])
    paged = PagedKV.from_buffer(chunked)
    assert torch.equal(paged.dense(torch.float16)[0][:, :, : (n // t) * t], one.gather(0, (n // t) * t)[0])


@native
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if kvprec.cuda_kernels_available() else []))
def test_refused_append_leaves_the_buffer_as_it_was(device):
    """The range check runs after the pages were written (one synchronisation); a refusal gives them back, pool
    growth included, so memory(), the table, the pools and the tail are exactly as before."""
    b, h, d, t = 1, 2, 32, 16
    buf = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32, device, default_tier="int4")
    x = torch.randn(b, h, 100, d, generator=torch.Generator().manual_seed(4)).to(device)
    buf.append(x[:, :, :20], x[:, :, :20])  # one block sealed, 4 tokens in the tail
    before = _state(buf)
    for bad_at, name in ((2, r"append: k \(with the tail keys it completes\)"), (40, "append: k would be sealed")):
        y = x[:, :, 20:100].clone()
        y[0, 1, bad_at, 3] = 1e6  # sealed straight from the input, or in the block that completes the tail
        with pytest.raises(ValueError, match=name + ".*65504"):
            buf.append(y, x[:, :, 20:100])  # 84 tokens: 5 blocks, the pool grows
        assert _same_state(_state(buf), before)
    nan_tail = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32, device, default_tier="int8")
    z = x[:, :, :10].clone()
    z[0, 0, 3, 0] = float("nan")
    nan_tail.append(x[:, :, :10], z)  # not sealed yet: the tail holds any value
    with pytest.raises(ValueError, match=r"append: v \(with the tail values it completes\).*got max \|x\| = nan"):
        nan_tail.append(x[:, :, 10:20], x[:, :, 10:20])
    assert nan_tail.seq_len == 10 and nan_tail.memory().reserved_bytes == 0
    # the same buffer then takes valid tokens exactly as a fresh one does
    buf.append(x[:, :, 20:100], x[:, :, 20:100])
    fresh = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32, device, default_tier="int4")
    fresh.append(x, x)
    assert torch.equal(buf.gather()[0], fresh.gather()[0]) and torch.equal(buf.pages(), fresh.pages())
    assert buf.memory().reserved_bytes == fresh.memory().reserved_bytes


@native
def test_range_is_checked_only_where_a_tier_needs_it():
    """Rows sealed at fp32 / bf16 store any finite value, even in a block whose other rows are integer tiers;
    the rows at integer tiers, or at fp16 from a wider model dtype, are checked."""
    b, h, d, t = 1, 3, 16, 8
    x = torch.randn(b, h, t, d)
    x[0, 0, 1, 2] = 1e6
    tiers = torch.tensor([[[int(Tier.FP32)], [int(Tier.INT4)], [int(Tier.BF16)]]], dtype=torch.int8)
    buf = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32)
    buf.append(x, x, tiers)
    assert buf.block(0)[0][0, 0, 1, 2].item() == 1e6
    for refused in (Tier.INT8, Tier.FP16):
        tiers[0, 0, 0] = int(refused)
        buf = MixedPrecisionBuffer(b, h, d, t, 8, torch.float32)
        with pytest.raises(ValueError, match="65504"):
            buf.append(x, x, tiers)
        assert buf.seq_len == 0
