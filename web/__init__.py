"""Static files of the dashboard, served by the server at /ui/, plotly.js included.

Only web assets are served from /ui/ (:class:`WebAssets`): this package's ``__init__.py``, bytecode and anything
else that is not a page, script, style sheet or image answers 404.

Clusters are often offline, so the dashboard never loads anything from a CDN: ``plotly_js`` answers
``/ui/vendor/plotly.min.js`` with ``vendor/plotly-basic.min.js``, plotly.js's official *basic* bundle (npm
``plotly.js-basic-dist-min``, MIT; ``make vendor-plotly`` refreshes it). The dashboard draws only scatter
traces and shapes, and the basic bundle is 1.2 MB where the full one the ``plotly`` Python package ships is
4.8 MB: on two shared cores the full bundle's compile and start took ~0.9-1.4 s of a first visit's first chart.
The bundle is compressed once per process, and cached by browsers for a week with an ETag that changes with
the file.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import html
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

ROOT = Path(__file__).resolve().parent
CACHE_CONTROL = "public, max-age=604800"
# What /ui/ may serve: the dashboard's pages, scripts and styles, and images should it ever ship some.
ASSET_SUFFIXES = frozenset({".html", ".js", ".css", ".png", ".svg", ".ico", ".jpg", ".jpeg", ".gif", ".webp"})


class WebAssets(StaticFiles):
    """StaticFiles limited to web assets: a file of any other kind (``__init__.py``, ``__pycache__/*.pyc``) is a
    404, as if it were not there. Directories still answer with their ``index.html``."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if PurePosixPath(path).suffix.lower() not in ASSET_SUFFIXES:
            # No asset suffix: only a directory (``/ui/`` itself) may be served, as its index.html.
            _, found = await anyio.to_thread.run_sync(self.lookup_path, path)
            if found is None or not stat.S_ISDIR(found.st_mode):
                raise HTTPException(status_code=404)
        return await super().get_response(path, scope)


_INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE)
_START_TAG = re.compile(r"<[a-z][^>]*>", re.IGNORECASE)
_EVENT_HANDLER = re.compile(r"""\son[a-z]+=(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


@functools.lru_cache(maxsize=1)
def inline_script_hashes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The CSP hashes of the inline code in the shipped pages: ``(scripts, event_handlers)``.

    A strict Content-Security-Policy runs no inline code unless its hash is listed. Hashing what the pages hold
    now (rather than a list kept by hand) keeps the policy right when a page's inline script changes, and lets
    only exactly that code run: an injected script or handler has another hash. Read once per process.
    """
    scripts: set[str] = set()
    handlers: set[str] = set()
    for page in sorted(ROOT.glob("*.html")):
        text = page.read_text(encoding="utf-8")
        scripts.update(_csp_hash(body) for body in _INLINE_SCRIPT.findall(text) if body.strip())
        # An attribute's code is hashed as the browser sees it: entity-decoded.
        for tag in _START_TAG.findall(text):
            handlers.update(_csp_hash(html.unescape(a or b)) for a, b in _EVENT_HANDLER.findall(tag))
    return tuple(sorted(scripts)), tuple(sorted(handlers))


PLOTLY_JS_VERSION = "4.1.1"  # of vendor/plotly-basic.min.js; the same as the plotly Python package ships


def plotly_js_path() -> Path:
    """The vendored plotly.js basic bundle (``web/vendor/plotly-basic.min.js``)."""
    return ROOT / "vendor" / "plotly-basic.min.js"


@dataclass(frozen=True)
class _Bundle:
    raw: bytes
    gzipped: bytes
    etag: str


@functools.lru_cache(maxsize=2)
def _bundle(path: Path, mtime_ns: int, size: int) -> _Bundle:
    """Read and compressed once per file version (the key changes when the file is replaced)."""
    del mtime_ns, size  # part of the cache key only
    raw = path.read_bytes()
    etag = '"' + hashlib.sha256(raw).hexdigest()[:20] + '"'
    return _Bundle(raw=raw, gzipped=gzip.compress(raw, compresslevel=6, mtime=0), etag=etag)


def plotly_js(request: Request) -> Response:
    """plotly.js, gzipped when the browser accepts it; 304 when its cached copy is current."""
    path = plotly_js_path()
    stat = path.stat()
    bundle = _bundle(path, stat.st_mtime_ns, stat.st_size)
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": bundle.etag, "Vary": "Accept-Encoding"}
    if bundle.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    media_type = "text/javascript; charset=utf-8"
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(bundle.gzipped, media_type=media_type, headers={**headers, "Content-Encoding": "gzip"})
    return Response(bundle.raw, media_type=media_type, headers=headers)
