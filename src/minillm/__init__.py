"""MiniLLM: a small, readable, fast LLM inference engine in PyTorch."""

from .compat import CacheOverflowError, KVCache
from .config import Configs, ModelConfig
from .engine import RequestFailed, RequestOutput
from .llm import LLM
from .loading import ModelLoadError
from .loading import open_tokenizer as load_tokenizer
from .model import MiniLLM
from .sampling_params import SamplingParams
from .text_generator import Generation, TextGenerator

__version__ = "0.1.0"

__all__ = [
    "LLM", "CacheOverflowError", "Configs", "Generation", "KVCache", "MiniLLM", "ModelConfig", "ModelLoadError",
    "RequestFailed", "load_tokenizer", "RequestOutput", "SamplingParams", "TextGenerator",
]
