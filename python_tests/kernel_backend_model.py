"""A one-layer Llama (head_dim 64, the Triton kernel's smallest) for comparing the kernel backends of AdaptiveCache
with the native one, or a skip where the backend cannot run here."""
import os

import pytest
import torch

import kvprec


def kernel_backend_model(backend: str):
    """(model, ids [1, 21], block_size, tolerance) for ``backend`` "triton" (FP32 on CPU under TRITON_INTERPRET=1, or
    on a GPU) or "cuda" (fp16 on a GPU, built with KVPREC_CUDA; blocks of >= 16 positions); pytest.skip otherwise."""
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel needs a CUDA device or TRITON_INTERPRET=1 (set by scripts/test.sh)")
    if backend == "cuda" and not (torch.cuda.is_available() and kvprec.cuda_kernels_available()):
        pytest.skip("the CUDA kernel needs a GPU and a build with KVPREC_CUDA")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    device, dtype = ("cuda", torch.float16) if backend == "cuda" else ("cpu", torch.float32)
    model = LlamaForCausalLM(config).eval().to(device, dtype)
    ids = torch.randint(3, 64, (1, 21), device=device)
    block_size, tol = (16, 2e-2) if backend == "cuda" else (8, 1e-4)
    return model, ids, block_size, tol
