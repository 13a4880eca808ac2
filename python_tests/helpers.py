"""Shared test helpers: parametrize by available device (CPU always, CUDA where present), compare bits, build awkward
blocks, and check that a study refuses bad arguments before writing anything."""
import pytest
import torch


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN-safe, distinguishes -0.0 from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def awkward_blocks(n: int, t: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[n, t, d] random values (CPU) plus what directed rounding and round-half-even must get right (where the
    shape has room for them: t >= 4, d >= 8)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=gen) * 3
    if t >= 4 and d >= 8:
        x[0, :, 0] = 0.0                                           # constant channel: scale 0
        x[0, :, 1] = -0.0                                          # min = max = -0: stored as +0
        x[0, :, 2] = torch.tensor([0.0, 0.5, 1.5, 3.0] * t)[:t]    # ties at the INT2 step of 1
        x[0, :, 3] = 1e-6                                          # FP16 subnormal range
        x[-1, :, 4] = torch.linspace(-65000, 65000, t)             # near the FP16 limits (bf16-representable)
        x[-1, 0, 5:8] = torch.tensor([-1e-8, 1e-8, -3.0])
        x[0, 2, :] = -0.0                                          # a token whose value groups are all -0
    return x.to(dtype)


def evicted_view(paged, count: int):
    """A PagedKV whose first ``count`` blocks are evicted, as a sliding-window layer leaves them: tier -1, page -1
    (a kernel that read them would index out of bounds), ``evicted_blocks = count``."""
    from dataclasses import replace

    tiers, pages = paged.tiers.clone(), paged.pages.clone()
    tiers[..., :count] = -1
    pages[..., :count] = -1
    return replace(paged, tiers=tiers, pages=pages, evicted_blocks=count)


def assert_refused_before_writing(main, argv: list, cases: list, tmp_path, capsys) -> None:
    """Each (extra arguments, message) of ``cases``: ``main(argv + extra + ["--out", DIR])`` exits with status 2,
    its error names ``message``, and DIR was never created (a study checks every argument before writing)."""
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(SystemExit) as exc:
            main(argv + extra + ["--out", str(out)])
        assert exc.value.code == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists()


def chat_tokenizer():
    """A character-level tokenizer with a ChatML-like chat template, 103 ids (the tiny model has 256)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{c: i + 3 for i, c in enumerate(string.printable)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def kernel_backend_model(backend: str):
    """A one-layer Llama (head_dim 64, the Triton kernel's smallest) for comparing AdaptiveCache's kernel backends
    with the native one: (model, ids [1, 21], block_size, tolerance) for ``backend`` "triton" (FP32 on CPU under
    TRITON_INTERPRET=1, or on a GPU) or "cuda" (fp16 on a GPU, built with KVPREC_CUDA; blocks of >= 16 positions);
    pytest.skip otherwise."""
    import os

    import kvprec

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
