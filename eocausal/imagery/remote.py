"""Imagery over HTTP: COGs read through GDAL's ``/vsicurl/``, folder listings, retries we control.

A remote file is a :class:`RemoteFile`: a path-like object whose ``os.fspath`` is the
``/vsicurl/`` path, so ``rasterio.open`` reads it with ranged GETs (only the header and the tiles
under a window). Every GDAL read of remote data runs under :func:`gdal_env`, which turns GDAL's own
HTTP retries off and stops it caching a failed request (else a 503 on the first HEAD would be
remembered as "no such file" and every retry would fail without asking the server again): the
one retry policy is ours (:mod:`eocausal.imagery.retry`), and every attempt is counted.

Errors are classified by :func:`classify_remote_error`: HTTP 4xx other than 408/429 are
permanent (a wrong URL, a forbidden object); 5xx, 408, 429, timeouts, resets and truncated
bodies are transient.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from html.parser import HTMLParser
from posixpath import basename
from typing import Callable
from urllib.parse import unquote, urljoin, urlsplit

import rasterio

from eocausal.imagery.retry import PERMANENT, TRANSIENT, RetryPolicy, RetryStats, call_with_retries

HTTP_PREFIXES = ("http://", "https://")
VSICURL = "/vsicurl/"
_STATUS_RE = re.compile(r"HTTP (?:response )?(?:code|status)[: ]+(\d{3})", re.IGNORECASE)

# Remote reads: fewer attempts and shorter waits than Earth Engine's quota-bound requests.
DEFAULT_REMOTE_RETRY = RetryPolicy(max_attempts=6, initial_delay_s=0.25, max_delay_s=8.0)


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(HTTP_PREFIXES)


class RemoteFile(os.PathLike):
    """A file at an http(s) URL; ``os.fspath`` gives GDAL's ``/vsicurl/`` path, ``str`` the URL."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        if not is_url(url):
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url

    @property
    def name(self) -> str:
        return unquote(basename(urlsplit(self.url).path))

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name else ""

    @property
    def parent(self) -> str:
        return urljoin(self.url, ".")

    def __fspath__(self) -> str:
        return VSICURL + self.url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteFile({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemoteFile) and other.url == self.url

    def __hash__(self) -> int:
        return hash(("remote", self.url))

    def __lt__(self, other) -> bool:
        return str(self) < str(other)


def gdal_path(location: str | os.PathLike) -> str:
    """The path GDAL opens: ``/vsicurl/<url>`` for an http(s) URL, else the local path."""
    if isinstance(location, str) and is_url(location):
        return VSICURL + location
    return os.fspath(location)


def gdal_env(timeout_s: float = 30.0) -> rasterio.Env:
    """A rasterio environment for remote reads: no GDAL retries, no caching of failed requests."""
    return rasterio.Env(
        GDAL_HTTP_MAX_RETRY=0,
        # Not cached across opens (prefix match): a retry asks the server again.
        CPL_VSIL_CURL_NON_CACHED="/vsicurl/http",
        GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",  # no directory listing to find sidecar files
        GDAL_HTTP_TIMEOUT=max(int(round(timeout_s)), 1),
        GDAL_HTTP_CONNECTTIMEOUT=max(int(round(min(timeout_s, 10.0))), 1),
        GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
    )


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an error (urllib's, requests', pystac-client's, or GDAL's message)."""
    seen: set[int] = set()
    cursor: BaseException | None = exc
    while cursor is not None and id(cursor) not in seen:
        seen.add(id(cursor))
        for attr in ("status_code", "code", "status"):
            value = getattr(cursor, attr, None)
            if isinstance(value, int) and 100 <= value <= 599:
                return value
        m = _STATUS_RE.search(str(cursor))
        if m:
            return int(m.group(1))
        cursor = cursor.__cause__ or cursor.__context__
    return None


def classify_remote_error(exc: BaseException) -> str | None:
    """TRANSIENT, PERMANENT, or None (not a fetch error: let it propagate)."""
    from rasterio.errors import RasterioError

    status = http_status(exc)
    if status is not None:
        if status in (408, 425, 429) or status >= 500:
            return TRANSIENT
        if 400 <= status < 500:
            return PERMANENT
    chain = []
    cursor: BaseException | None = exc
    while cursor is not None and len(chain) < 8:
        chain.append(cursor)
        cursor = cursor.__cause__ or cursor.__context__
    for e in chain:
        if isinstance(e, (TimeoutError, ConnectionError, urllib.error.URLError, RasterioError)):
            return TRANSIENT
        module = type(e).__module__ or ""
        if module.startswith(("requests", "urllib3", "http.client", "socket", "ssl", "pystac_client")):
            return TRANSIENT
    return None


def retry_kind(exc: BaseException) -> str:
    status = http_status(exc)
    if status == 429:
        return "http_429"
    if status is not None:
        return f"http_{status}" if status < 500 else "http_5xx"
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    return "read_error"


def describe(exc: BaseException) -> str:
    status = http_status(exc)
    text = " ".join(str(exc).split())[:300]
    return f"HTTP {status}: {text}" if status and str(status) not in text else text or type(exc).__name__


def with_retries(fn: Callable, *, policy: RetryPolicy = DEFAULT_REMOTE_RETRY, stats: RetryStats | None = None,
                 sleep: Callable[[float], None] | None = None, on_retry: Callable | None = None):
    """``fn()`` with the remote retry policy (raises retry.GaveUp when it gives up)."""
    return call_with_retries(fn, policy=policy, classify=classify_remote_error, kind_of=retry_kind,
                             describe=describe, stats=stats, sleep=sleep, on_retry=on_retry)


# -- plain HTTP (listings, headers) --------------------------------------------------------------


def _request(url: str, method: str, timeout_s: float) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "eocausal"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (http(s) only: is_url)
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read() if method != "HEAD" else b""


def http_get(url: str, *, timeout_s: float = 30.0, policy: RetryPolicy = DEFAULT_REMOTE_RETRY,
             stats: RetryStats | None = None, sleep=None) -> bytes:
    return with_retries(lambda: _request(url, "GET", timeout_s)[2], policy=policy, stats=stats, sleep=sleep)


def remote_identity(url: str, *, timeout_s: float = 30.0, policy: RetryPolicy = DEFAULT_REMOTE_RETRY,
                    stats: RetryStats | None = None, sleep=None) -> str:
    """What identifies a remote file's content without downloading it: size, ETag, Last-Modified."""
    _, headers, _ = with_retries(lambda: _request(url, "HEAD", timeout_s), policy=policy, stats=stats, sleep=sleep)
    parts = [headers.get("content-length", ""), headers.get("etag", ""), headers.get("last-modified", "")]
    return hashlib.sha256("\0".join([url, *parts]).encode()).hexdigest()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag.lower() == "a":
            for key, value in attrs:
                if key.lower() == "href" and value:
                    self.hrefs.append(value)


def list_folder(url: str, suffixes: tuple[str, ...], *, timeout_s: float = 30.0,
                policy: RetryPolicy = DEFAULT_REMOTE_RETRY, sleep=None) -> list[RemoteFile]:
    """The files directly in a remote folder (an HTML index, as web servers and buckets' static
    sites list them) whose names end with one of ``suffixes``; subfolders and parents are skipped."""
    base = url if url.endswith("/") else url + "/"
    page = http_get(base, timeout_s=timeout_s, policy=policy, sleep=sleep).decode("utf-8", "replace")
    parser = _Links()
    parser.feed(page)
    base_path = urlsplit(base).path
    found: dict[str, RemoteFile] = {}
    for href in parser.hrefs:
        target = urljoin(base, href.split("#")[0])
        parts = urlsplit(target)
        if parts.netloc != urlsplit(base).netloc or not parts.path.startswith(base_path):
            continue
        rest = parts.path[len(base_path):]
        if not rest or "/" in rest.rstrip("/") or rest.endswith("/"):
            continue
        name = unquote(rest)
        if name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        found[target] = RemoteFile(target)
    return sorted(found.values())


def is_permanent(exc: BaseException) -> bool:
    return classify_remote_error(exc) == PERMANENT
