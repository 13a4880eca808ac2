"""The op registry: every native op has a fake kernel, the format ops pass opcheck, and importing kvprec
without the native library works while native calls then raise a clear error."""
import subprocess
import sys
import textwrap

import pytest
import torch

import kvprec
from kvprec.ops import native as _ops

from helpers import available_devices

native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def _native_op_names():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kvprec::"))


def _takes_or_gives_tensors(name: str) -> bool:
    """Whether the op's schema has a Tensor argument or return. The host-only ops (the CPU ISA switch and report:
    strings in, strings out) never meet a fake tensor, so torch.compile needs no fake kernel for them."""
    schema = getattr(torch.ops.kvprec, name.split("::")[1]).default._schema
    return any("Tensor" in str(x.type) for x in (*schema.arguments, *schema.returns))


@native
def test_every_native_op_has_a_fake():
    names = _native_op_names()
    assert "kvprec::quantize_keys" in names
    host_only = [n for n in names if not _takes_or_gives_tensors(n)]
    assert set(host_only) == {"kvprec::cpu_isa", "kvprec::set_cpu_isa", "kvprec::cpu_isa_unsupported",
                              "kvprec::cpu_features"}, host_only  # a new op without tensors is looked at here
    missing = [n for n in names if n not in host_only and n not in _ops.registered_fakes()]
    assert not missing, f"native ops without a fake kernel in kvprec/ops/native.py: {missing}"


@native
@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("tier", [1, 3, 4, 5])
def test_format_ops_opcheck(device, tier):
    x = torch.randn(2, 7, 16, device=device, dtype=torch.float16)
    torch.library.opcheck(torch.ops.kvprec.quantize_keys.default, (x, tier))
    torch.library.opcheck(torch.ops.kvprec.quantize_values.default, (x, tier, 8))
    codes, scale, zero = torch.ops.kvprec.quantize_keys(x, tier)
    torch.library.opcheck(torch.ops.kvprec.dequantize_keys.default, (codes, scale, zero, tier, 16, torch.float16))
    codes, scale, zero = torch.ops.kvprec.quantize_values(x, tier, 8)
    torch.library.opcheck(torch.ops.kvprec.dequantize_values.default,
                          (codes, scale, zero, tier, 16, 8, torch.float32))


def test_import_without_native_library():
    """Hide kvprec._C: import still works, the reference runs, a native op names the fix."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "kvprec._C":
                    raise ImportError("kvprec._C hidden by the test")
        sys.meta_path.insert(0, Block())
        import torch, kvprec
        assert not kvprec.native_available()
        q = kvprec.ops.quantize_keys(torch.randn(1, 4, 8), "int4")   # auto -> torch reference
        assert q.codes.shape == (1, 4, 4)
        try:
            kvprec.ops.quantize_keys(torch.randn(1, 4, 8), "int4", backend="cpp")
        except RuntimeError as e:
            assert "pip install --no-build-isolation -e ." in str(e) and "hidden by the test" in str(e), e
        else:
            raise SystemExit("no error")
        try:
            kvprec.require_native("MixedPrecisionBuffer")
        except RuntimeError as e:
            assert "MixedPrecisionBuffer needs the kvprec native library" in str(e)
        else:
            raise SystemExit("no error")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
