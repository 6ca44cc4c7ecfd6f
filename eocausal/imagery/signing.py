"""Planetary Computer signing of STAC asset hrefs (``imagery.sign: planetary_computer``).

Microsoft Planetary Computer's assets are read with a SAS token appended to the href. A token is
asked per storage account and container from ``<endpoint>/<account>/<container>`` (by default
https://planetarycomputer.microsoft.com/api/sas/v1/token; ``PC_SDK_SAS_URL`` overrides it and
``PC_SDK_SUBSCRIPTION_KEY`` is sent as ``Ocp-Apim-Subscription-Key``, the names the
``planetary-computer`` package reads), kept until a minute before its ``msft:expiry``, then asked
again.

Not the ``planetary-computer`` package: its ``sign`` signs only hrefs on ``*.blob.core.windows.net``
(anything else, such as a test server on 127.0.0.1, is returned unsigned), so its path cannot be
exercised offline; the token fetch and cache it does are these few lines.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Callable
from urllib.parse import urlparse

from eocausal.imagery.geotiff import ImageryError

DEFAULT_SAS_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
SAS_URL_ENV = "PC_SDK_SAS_URL"
SUBSCRIPTION_KEY_ENV = "PC_SDK_SUBSCRIPTION_KEY"
PLANETARY_COMPUTER_HOST = "planetarycomputer.microsoft.com"
BLOB_DOMAIN = ".blob.core.windows.net"
REFRESH_MARGIN_S = 60.0  # a token with less than this left is asked for again
# A SAS token's signature in a URL (GDAL and rasterio errors quote the URL they opened).
_SIGNATURE = re.compile(r"([?&]sig=)[^&\s'\"]+")


def without_signature(text: str) -> str:
    """``text`` with every SAS signature (``sig=...``) in it replaced: error messages, chip failure
    records and logs never carry a usable token."""
    return _SIGNATURE.sub(r"\1[redacted]", text)


class SigningError(ImageryError):
    """The token endpoint refused or answered something that is not a token."""


def storage_location(href: str) -> tuple[str, str]:
    """(account, container) of an asset href: ``https://<account>.blob.core.windows.net/<container>/...``.

    For another host the account is the host itself (a mirror or a test server).
    """
    parsed = urlparse(href)
    host = parsed.hostname or ""
    account = host[: -len(BLOB_DOMAIN)] if host.endswith(BLOB_DOMAIN) else host
    container = parsed.path.lstrip("/").split("/", 1)[0]
    if not account or not container:
        raise SigningError(f"cannot tell the storage account and container of {href}")
    return account, container


class SasSigner:
    """Appends a SAS token to http(s) hrefs; one token per (account, container), refreshed before expiry."""

    def __init__(self, endpoint: str | None = None, *, subscription_key: str | None = None,
                 timeout_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.endpoint = (endpoint or os.environ.get(SAS_URL_ENV) or DEFAULT_SAS_URL).rstrip("/")
        self._key = subscription_key if subscription_key is not None else os.environ.get(SUBSCRIPTION_KEY_ENV)
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self.token_requests = 0

    def expired(self, expiry: float) -> bool:
        return self._clock() >= expiry - REFRESH_MARGIN_S

    def sign(self, href: str) -> tuple[str, float]:
        """(signed href, the token's expiry as epoch seconds); hrefs that are not http(s) or already signed pass."""
        parsed = urlparse(href)
        if parsed.scheme not in ("http", "https"):
            return href, float("inf")
        query = dict(p.split("=", 1) for p in parsed.query.split("&") if "=" in p)
        if {"st", "se", "sp", "sig"} & set(query):
            return href, float("inf")
        token, expiry = self.token(*storage_location(href))
        return f"{href}{'&' if parsed.query else '?'}{token}", expiry

    def token(self, account: str, container: str) -> tuple[str, float]:
        key = (account, container)
        with self._lock:  # one request per container, however many threads ask
            cached = self._tokens.get(key)
            if cached is None or self.expired(cached[1]):
                cached = self._tokens[key] = self._fetch(account, container)
            return cached

    def _fetch(self, account: str, container: str) -> tuple[str, float]:
        url = f"{self.endpoint}/{account}/{container}"
        headers = {"Ocp-Apim-Subscription-Key": self._key} if self._key else {}
        self.token_requests += 1
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout_s) as resp:
                doc = json.loads(resp.read())
            token = str(doc["token"])
            expiry = datetime.fromisoformat(str(doc["msft:expiry"]).replace("Z", "+00:00")).timestamp()
        except urllib.error.HTTPError as exc:
            raise SigningError(
                f"imagery.sign planetary_computer: the token endpoint {url} answered HTTP {exc.code}"
                + (" (set PC_SDK_SUBSCRIPTION_KEY if the endpoint needs a subscription key)"
                   if exc.code in (401, 403) else "")) from None
        except (urllib.error.URLError, OSError) as exc:
            raise SigningError(f"imagery.sign planetary_computer: the token endpoint {url} cannot be reached: "
                               f"{exc}") from None
        except (ValueError, KeyError, TypeError):
            raise SigningError(f"imagery.sign planetary_computer: the token endpoint {url} answered something "
                               "that is not a SAS token (token, msft:expiry)") from None
        return token, expiry
