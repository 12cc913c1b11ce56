"""The chat page at `/`: three static files (web/) that talk to /v1/chat/completions from the browser. The
page and its assets are public (it asks for the API key itself); everything it calls stays behind the key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

_WEB = Path(__file__).parent / "web"
_FILES = {"/": ("index.html", "text/html"), "/chat.js": ("chat.js", "text/javascript"),
          "/chat.css": ("chat.css", "text/css")}
# Defence in depth beside the page's escaping: no inline script, no script or connection to another origin.
_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

WEB_UI_PATHS = frozenset(_FILES)  # public: the page asks for the API key itself


def add_web_ui(app: FastAPI) -> None:
    for route, (name, media_type) in _FILES.items():
        app.add_api_route(route, _file_route(_WEB / name, media_type), methods=["GET"], include_in_schema=False)


def _file_route(path: Path, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def serve() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers=_HEADERS)

    return serve
