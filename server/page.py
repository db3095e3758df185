"""The speech server's web page: type, pick or upload a voice, hear it as it streams (the files are in server/web/).

    GET /                  server/web/index.html
    GET /page/{name}       the page's own scripts and style (the files of server/web/, nothing else)
    GET /page/settings     {"api_key_required": bool}: whether the page must ask for the server's key

The page is plain HTML, CSS and JavaScript modules: no build step, nothing fetched from elsewhere. It talks to the
same /v1 API as any client (the key, when the server has one, stays in the browser tab), so these routes are open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from .schema import APIError

PAGE_FOLDER = Path(__file__).resolve().parent / "web"
# The served files and their media types (a name not listed here is a 404, so no path reaches outside the folder).
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".png": "image/png"}
# Browsers revalidate the page's files on each load, so an updated server is never paired with stale scripts.
NO_STALE_FILES = {"Cache-Control": "no-cache"}


def page_files() -> dict:
    """{file name: path} of the files the page serves (none where server/web/ was not installed: the API still
    serves)."""
    if not PAGE_FOLDER.is_dir():
        return {}
    return {path.name: path for path in sorted(PAGE_FOLDER.iterdir())
            if path.is_file() and path.suffix in MEDIA_TYPES}


def page_router(api_key: Optional[str]) -> APIRouter:
    """The page's routes (module docstring)."""
    router = APIRouter()
    files = page_files()

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return _file(files, "index.html")

    @router.get("/page/settings", include_in_schema=False)
    async def settings() -> JSONResponse:
        return JSONResponse({"api_key_required": bool(api_key)}, headers=NO_STALE_FILES)

    @router.get("/page/{name}", include_in_schema=False)
    async def page_file(name: str) -> FileResponse:
        return _file(files, name)

    return router


def _file(files: dict, name: str) -> FileResponse:
    path = files.get(name)
    if path is None:
        expected = f"one of {', '.join(files)}" if files else f"none here: {PAGE_FOLDER} is not installed"
        raise APIError(404, f"no page file {name!r}; expected {expected}", code="not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_STALE_FILES)


__all__ = ["PAGE_FOLDER", "page_files", "page_router"]
