from .generator import Generation, TextGenerator

__all__ = ["Generation", "TextGenerator"]
