"""The OpenAI-compatible HTTP server (`minillm serve`)."""

from .app import create_app

__all__ = ["create_app"]
