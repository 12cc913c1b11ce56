"""MiniLLM: a small, readable, fast LLM inference engine in PyTorch."""

from .cache import CacheOverflowError, KVCache
from .config import Configs, ModelConfig
from .generation import Generation, TextGenerator
from .model import MiniLLM

__version__ = "0.1.0"

__all__ = ["CacheOverflowError", "Configs", "Generation", "KVCache", "MiniLLM", "ModelConfig", "TextGenerator"]
