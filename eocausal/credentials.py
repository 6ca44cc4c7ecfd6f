"""Credentials come from the environment only; this module keeps their values out of what we write.

Nothing in eocausal stores a credential: the Earth Engine client reads its key file when it
initialises (eocausal.imagery.earthengine). Records built from free text that other code
produced — error messages in alert records, for one — pass through :func:`redact` first, as a
second line of defence.
"""

from __future__ import annotations

import os
import re

# Variables that hold a credential, or name a file holding one (then the path is redacted too:
# it says where the key lives).
CREDENTIAL_ENV_VARS = (
    "EOCAUSAL_EE_KEY",
    "EOCAUSAL_EE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
# Any other variable whose name says it holds a secret.
_SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)S?$", re.IGNORECASE)
# Short values ('1', 'true') would redact unrelated text; real secrets are longer.
_MIN_SECRET_LEN = 8
REDACTED = "[redacted]"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of credential variables set in the environment, longest first."""
    env = os.environ if environ is None else environ
    values = {
        value.strip()
        for name, value in env.items()
        if (name in CREDENTIAL_ENV_VARS or _SECRET_NAME.search(name)) and len(value.strip()) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with every credential value from the environment replaced by '[redacted]'."""
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return text
