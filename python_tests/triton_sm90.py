"""Compile Triton launches for sm_90 without a GPU (the installed triton and its bundled ptxas): the interpreter
that runs the kernels on CPU does not check what the compiler does (constexpr-only globals, layouts, dot shapes,
shared memory, the rounding in the PTX).

A test writes a script that imports this module, records the launches of its launchers with
:func:`record_launches`, compiles each with :func:`compile_sm90`, and runs it with :func:`run_compile_script`
(a subprocess without TRITON_INTERPRET, so that triton compiles instead of interpreting).
"""
import os
import subprocess
import sys

import torch

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
         torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def record_launches(*modules) -> list:
    """Replace ``wrap_triton`` in each launcher module by a stand-in that keeps every launch instead of running
    it; returns the list the launches go to, as (kernel, args, kwargs)."""
    launches = []

    class Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.kernel, args, kw))

    for module in modules:
        module.wrap_triton = Record
    return launches


def compile_sm90(kernel, args, kw):
    """One recorded launch compiled for sm_90: tensors become typed pointers, floats fp32, other scalars i32,
    keyword arguments constexprs (or compile options)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, opts = {}, {}, {}
    for name, a in zip(kernel.arg_names, args):
        sig[name] = "*" + TYPES[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else "i32"
    for name, a in kw.items():
        if name in _OPTIONS:
            opts[name] = a
        else:
            sig[name], const[name] = "constexpr", a
    sig = {n: sig[n] for n in kernel.arg_names}
    return triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32), options=opts)


def run_compile_script(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET, with this directory importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
