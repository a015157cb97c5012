"""Static files of the dashboard, served by the server at /ui/; plotly.js comes from the installed ``plotly``.

Clusters are often offline, so the dashboard never loads anything from a CDN: ``plotly_js`` answers
``/ui/vendor/plotly.min.js`` with the copy that the ``plotly`` Python package ships (about 4.8 MB, 1.4 MB
gzipped). It is compressed once per process, and cached by browsers for a week with an ETag that changes
with the installed file, so an upgrade of ``plotly`` is picked up at the next revalidation.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

ROOT = Path(__file__).resolve().parent
CACHE_CONTROL = "public, max-age=604800"


def plotly_js_path() -> Path:
    """The plotly.js bundle of the installed ``plotly`` package (``plotly/package_data/plotly.min.js``)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise RuntimeError("the plotly package is not installed: pip install plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall the plotly package")
    return path


@dataclass(frozen=True)
class _Bundle:
    raw: bytes
    gzipped: bytes
    etag: str


@functools.lru_cache(maxsize=2)
def _bundle(path: Path, mtime_ns: int, size: int) -> _Bundle:
    """Read and compressed once per installed file (the key changes when the package is upgraded)."""
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
