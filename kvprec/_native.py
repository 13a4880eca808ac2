"""Loading of the native library (kvprec._C). Importing kvprec never fails because it did not load: the
reason is kept, and :func:`require_native` raises it, with how to build, when a native op is called."""
from __future__ import annotations

import logging

import torch  # noqa: F401  (the extension has no RUNPATH to torch/lib: torch must be loaded first)

log = logging.getLogger("kvprec")

BUILD_HINT = ("build it with `pip install torch==2.13.0 && pip install --no-build-isolation -e .` in the kvprec "
               "checkout (see README.md)")

try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrars)

    NATIVE_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test with the module hidden
    NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
    log.info("kvprec native library not loaded (%s); the pure-torch reference path still works", NATIVE_ERROR)


def native_available() -> bool:
    return NATIVE_ERROR is None


def cuda_kernels_available() -> bool:
    """True when the native library was built with its CUDA kernels (KVPREC_CUDA) and a GPU is present."""
    if not native_available() or not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("kvprec::quantize_keys", "CUDA")


def require_native(what: str) -> None:
    """Raise a clear error naming ``what`` if the native library is not loaded."""
    if NATIVE_ERROR is not None:
        raise RuntimeError(f"{what} needs the kvprec native library, which did not load ({NATIVE_ERROR}); "
                           f"{BUILD_HINT}")


def cpu_isa() -> str:
    """The instruction-set path of the native CPU kernels: ``"scalar"``, ``"avx2"``, ``"avx512"`` or
    ``"avx512_vnni"``, chosen when the library loaded (the best one cpuid allows, or the one the environment variable
    KVPREC_CPU_ISA names). Raises RuntimeError when KVPREC_CPU_ISA names a path this CPU or build cannot run, or when
    the native library did not load."""
    require_native("cpu_isa")
    return torch.ops.kvprec.cpu_isa()
