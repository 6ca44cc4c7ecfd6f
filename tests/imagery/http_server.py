"""A local HTTP server for remote-imagery tests: files with range requests, faults, a fake STAC API.

:class:`FileServer` serves a folder on 127.0.0.1 (an ephemeral port) the way object stores serve
COGs: ``HEAD`` and ``GET`` with single byte ranges (``206 Partial Content``), an HTML index for a
folder (an Apache-style listing), and a log of every request. Faults are injected per request
number or per path: a 5xx status, a delay (a slow response), a truncated body.

:class:`FakeStacApi` mounts a STAC API at ``/api`` on the same server: the landing page (with the
item-search and query conformance classes), ``/api/collections/<id>`` and ``/api/search`` (GET and
POST; collections, datetime, bbox, ``query`` on ``eo:cloud_cover``; paged by ``limit`` with a
``next`` link), answering from the items of a static catalog on disk.

The server runs in its own process: GDAL holds the GIL in a few calls while it waits for a
response (or for a lock held by a thread waiting for one), so a server thread in the reader's own
process could not answer and the reader would stall until its timeout. Its request log and the
API's searches are read back over HTTP (``/_log``, ``/_searches``).
"""

from __future__ import annotations

import html
import json
import multiprocessing
import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Faults:
    """What goes wrong. Request numbers are 1-based over the requests whose path matches ``only``."""

    status_at: dict[int, int] = field(default_factory=dict)  # request number -> status (e.g. 503)
    delay_at: dict[int, float] = field(default_factory=dict)  # request number -> seconds before answering
    truncate_at: set[int] = field(default_factory=set)  # request number -> half the body, then close
    only: str = ""  # a path substring the numbering (and faults) apply to; "" = every request
    status_every: int = 0  # every n-th matching request answers `status` (0 = never)
    status: int = 503
    # When set, .tif files answer 403 unless the query holds every one of these parameters (a SAS token).
    require_query: tuple[str, ...] = ()


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    seconds: float


class FileServer:
    """Serve ``root`` over HTTP on 127.0.0.1 from a child process; use as a context manager."""

    def __init__(self, root: Path, faults: Faults | None = None):
        self.root = Path(root).resolve()
        self.faults = faults or Faults()
        self._process = None
        self._port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def url_of(self, path: Path | str) -> str:
        rel = Path(path).resolve().relative_to(self.root).as_posix() if Path(str(path)).is_absolute() else str(path)
        return f"{self.url}/{quote(rel)}"

    def start(self) -> "FileServer":
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._process = ctx.Process(target=_run_server, args=(str(self.root), self.faults, child), daemon=True)
        self._process.start()
        if not parent.poll(60):
            raise RuntimeError("test HTTP server did not start")
        self._port = parent.recv()
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join(10)
            if self._process.is_alive():  # never leave a server for interpreter exit to wait on
                self._process.kill()
                self._process.join(10)

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _control(self, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=30) as resp:
            return json.loads(resp.read())

    @property
    def requests(self) -> list[Request]:
        return [Request(**r) for r in self._control("/_log")]

    def count(self, path_part: str = "", status: int | None = None, method: str | None = None) -> int:
        return sum(1 for r in self.requests if path_part in r.path and (status is None or r.status == status)
                   and (method is None or r.method == method))

    def mount_api(self, items: list[dict], collections: list[dict]) -> "FakeStacApi":
        self._control("/_api", {"items": items, "collections": collections})
        return FakeStacApi(self)


def _run_server(root: str, faults: Faults, conn) -> None:
    # A parent that ignores SIGTERM (Dagster maps SIGTERM to SIGINT's handler, which is SIG_IGN in a
    # background job) hands that on to this process: restore the default so stop() ends it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    server = _Server(Path(root), faults)
    conn.send(server.port)
    server.serve_forever()


class _Server:
    """The serving side (in the child process)."""

    def __init__(self, root: Path, faults: Faults):
        self.root = Path(root).resolve()
        self.faults = faults
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._matching = 0
        self.api: _StacApi | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

            def do_POST(self):
                server._handle(self, head=False)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default 5 drops connections of a parallel reader

            def handle_error(self, request, client_address):
                pass  # a client that gave up (a timeout test) resets its connection: not an error

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    # -- handling -----------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        started = time.perf_counter()
        parsed = urlparse(h.path)
        path = unquote(parsed.path)
        body = b""
        if h.command == "POST":
            body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if path in ("/_log", "/_searches", "/_api"):
            self._control(h, path, body)
            return
        f = self.faults
        number = None
        if not f.only or f.only in path:
            with self._lock:
                self._matching += 1
                number = self._matching
        status = self._serve(h, head, path, parsed.query, body, number)
        with self._lock:
            self.requests.append({"method": h.command, "path": path, "range": h.headers.get("Range"),
                                  "status": status, "seconds": time.perf_counter() - started})

    def _control(self, h, path: str, body: bytes) -> None:
        if path == "/_api":
            doc = json.loads(body)
            self.api = _StacApi(f"http://127.0.0.1:{self.port}/api", doc["items"], doc["collections"])
            payload: object = {"ok": True}
        elif path == "/_searches":
            payload = self.api.searches if self.api else []
        else:
            with self._lock:
                payload = list(self.requests)
        self._send(h, False, 200, json.dumps(payload).encode(), "application/json")

    def _fault(self, h, number: int | None) -> int | None:
        f = self.faults
        if number is None:
            return None
        if number in f.delay_at:
            time.sleep(f.delay_at[number])
        status = f.status_at.get(number)
        if status is None and f.status_every and number % f.status_every == 0:
            status = f.status
        if status is not None:
            payload = f"injected {status}".encode()
            h.send_response(status)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(payload)))
            if status == 429:
                h.send_header("Retry-After", "0")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return status
        return None

    def _serve(self, h, head: bool, path: str, query: str, body: bytes, number: int | None) -> int:
        injected = self._fault(h, number)
        if injected is not None:
            return injected
        if self.api is not None and (path == "/api" or path.startswith("/api/")):
            status, payload, ctype = self.api.answer(h.command, path, query, body)
            return self._send(h, head, status, payload, ctype)
        if self.faults.require_query and path.endswith(".tif"):
            given = {p.split("=", 1)[0] for p in query.split("&") if "=" in p}
            if not set(self.faults.require_query) <= given:
                return self._send(h, head, 403, b"no SAS token", "text/plain")
        target = (self.root / path.lstrip("/")).resolve()
        if target != self.root and self.root not in target.parents:
            return self._send(h, head, 403, b"outside", "text/plain")
        if target.is_dir():
            return self._send(h, head, 200, self._listing(target, path).encode(), "text/html")
        if not target.is_file():
            return self._send(h, head, 404, b"not found", "text/plain")
        data = target.read_bytes()
        ctype = "application/json" if target.suffix == ".json" else "image/tiff"
        rng = h.headers.get("Range")
        if rng:
            m = _RANGE_RE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._send(h, head, 416, b"", "text/plain")
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            else:  # a suffix range: the last n bytes
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            if start >= len(data):
                return self._send(h, head, 416, b"", "text/plain",
                                  extra={"Content-Range": f"bytes */{len(data)}"})
            chunk = data[start:end + 1]
            return self._send(h, head, 206, chunk, ctype, number=number,
                              extra={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        return self._send(h, head, 200, data, ctype, number=number)

    def _send(self, h, head, status, payload: bytes, ctype: str, extra: dict | None = None,
              number: int | None = None) -> int:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(payload)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{len(payload)}"' if status != 206 else '"range"')
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return status
        if number is not None and number in self.faults.truncate_at:
            h.wfile.write(payload[: len(payload) // 2])
            h.close_connection = True
            return status
        h.wfile.write(payload)
        return status

    @staticmethod
    def _listing(folder: Path, path: str) -> str:
        base = path if path.endswith("/") else path + "/"
        links = "\n".join(
            f'<a href="{quote(base + p.name)}{"/" if p.is_dir() else ""}">{html.escape(p.name)}</a><br>'
            for p in sorted(folder.iterdir())
        )
        return f"<html><head><title>Index of {html.escape(path)}</title></head><body>\n" \
               f'<a href="../">../</a><br>\n{links}\n</body></html>\n'


# -- a fake STAC API -----------------------------------------------------------------------------


def _parse_dt(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


class FakeStacApi:
    """The test's handle on the STAC API a :class:`FileServer` serves at ``/api``."""

    def __init__(self, server: FileServer):
        self.server = server

    @property
    def url(self) -> str:
        return f"{self.server.url}/api"

    @property
    def searches(self) -> list[dict]:
        return self.server._control("/_searches")


class _StacApi:
    """A STAC API (item search) over a list of item dicts, mounted at ``/api`` (in the server process)."""

    MAX_PAGE = 2  # the server's page size limit: searches of more items page through 'next' links
    CONFORMANCE = [
        "https://api.stacspec.org/v1.0.0/core",
        "https://api.stacspec.org/v1.0.0/item-search",
        "https://api.stacspec.org/v1.0.0/item-search#query",
        "https://api.stacspec.org/v1.0.0/collections",
    ]

    def __init__(self, url: str, items: list[dict], collections: list[dict]):
        self.url = url
        self.items = items
        self.collections = {c["id"]: c for c in collections}
        self.searches: list[dict] = []

    def _link(self, rel, href, method=None, body=None, mtype="application/json"):
        link = {"rel": rel, "href": href, "type": mtype}
        if method:
            link["method"] = method
        if body is not None:
            link["body"] = body
        return link

    def answer(self, method: str, path: str, query: str, body: bytes) -> tuple[int, bytes, str]:
        base = self.url
        if path in ("/api", "/api/"):
            doc = {
                "type": "Catalog", "stac_version": "1.0.0", "id": "fake-api", "description": "test STAC API",
                "conformsTo": self.CONFORMANCE,
                "links": [
                    self._link("self", base), self._link("root", base),
                    self._link("search", f"{base}/search", "GET", mtype="application/geo+json"),
                    self._link("search", f"{base}/search", "POST", mtype="application/geo+json"),
                    self._link("data", f"{base}/collections"),
                    self._link("conformance", f"{base}/conformance"),
                ],
            }
            return 200, json.dumps(doc).encode(), "application/json"
        if path == "/api/conformance":
            return 200, json.dumps({"conformsTo": self.CONFORMANCE}).encode(), "application/json"
        if path == "/api/collections":
            return 200, json.dumps({"collections": list(self.collections.values()), "links": []}).encode(), \
                "application/json"
        if path.startswith("/api/collections/"):
            cid = path.split("/")[3]
            if cid not in self.collections:
                return 404, b'{"code": "NotFound"}', "application/json"
            return 200, json.dumps(self.collections[cid]).encode(), "application/json"
        if path == "/api/search":
            if method == "POST":
                params = json.loads(body or b"{}")
            else:
                raw = {k: v[0] for k, v in parse_qs(query).items()}
                params = dict(raw)
                for key in ("collections", "bbox", "ids"):
                    if key in params:
                        params[key] = params[key].split(",")
                if "bbox" in params:
                    params["bbox"] = [float(v) for v in params["bbox"]]
                if "query" in params:
                    params["query"] = json.loads(params["query"])
                if "limit" in params:
                    params["limit"] = int(params["limit"])
            self.searches.append(params)
            return 200, json.dumps(self._search(params)).encode(), "application/geo+json"
        return 404, b'{"code": "NotFound"}', "application/json"

    def _search(self, params: dict) -> dict:
        hits = [i for i in self.items if self._matches(i, params)]
        limit = min(int(params.get("limit") or 10), self.MAX_PAGE)
        offset = int(params.get("token") or 0)
        page = hits[offset: offset + limit]
        links = [self._link("self", f"{self.url}/search")]
        if offset + limit < len(hits):
            links.append(self._link("next", f"{self.url}/search", "POST", body={**params, "token": offset + limit},
                                    mtype="application/geo+json"))
        return {"type": "FeatureCollection", "features": page, "links": links,
                "numberMatched": len(hits), "numberReturned": len(page)}

    @staticmethod
    def _matches(item: dict, params: dict) -> bool:
        if params.get("collections") and item.get("collection") not in params["collections"]:
            return False
        dt_range = params.get("datetime")
        if dt_range:
            start, _, end = str(dt_range).partition("/")
            when = _parse_dt(item["properties"]["datetime"])
            if start not in ("", "..") and when < _parse_dt(start):
                return False
            if end not in ("", "..") and when > _parse_dt(end):
                return False
        if params.get("bbox"):
            w, s, e, n = params["bbox"]
            iw, is_, ie, in_ = item["bbox"]
            if iw > e or ie < w or is_ > n or in_ < s:
                return False
        for prop, ops in (params.get("query") or {}).items():
            value = item["properties"].get(prop)
            for op, bound in ops.items():
                if value is None:
                    return False
                ok = {"lt": value < bound, "lte": value <= bound, "gt": value > bound, "gte": value >= bound,
                      "eq": value == bound}.get(op, True)
                if not ok:
                    return False
        return True
