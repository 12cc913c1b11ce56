from .transformer import MiniLLM

__all__ = ["MiniLLM"]
