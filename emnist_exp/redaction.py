"""URLs that may hold a secret (the Optuna storage, MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI), made fit to print."""

from __future__ import annotations

import re

SECRET_QUERY = re.compile(r"((?:password|token|secret)=)[^&]*", re.IGNORECASE)  # ?password=..., ?token=...


def redact(url: str) -> str:
    """The URL without its password or token, fit for logs and error messages (even when malformed).

    SQLAlchemy parses the URL (any scheme: postgresql, sqlite, http, ...), so a password is hidden
    whatever it holds (/, :, ?, #); a URL it cannot parse, or one with a second @ (which it would
    split at the first), loses everything between the user name and the last @.
    """
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    url = str(url)
    if "@" not in url:  # no user information, nothing to hide there: the URL as it was written
        return SECRET_QUERY.sub(r"\1***", url)
    try:
        text = make_url(url).render_as_string(hide_password=True) if url.count("@") == 1 else None
    except Exception:  # noqa: BLE001 (ArgumentError, ValueError: a malformed URL)
        text = None
    if text is None or text.startswith(("http://", "https://")):
        text = _userinfo_hidden(url)  # SQLAlchemy would re-quote an HTTP path and drop its fragment
    return SECRET_QUERY.sub(r"\1***", text)


def _userinfo_hidden(url: str) -> str:
    """`scheme://user:***@host...`: the password between the user name and the last @ replaced."""
    head, at, host = url.rpartition("@")
    start = head.find("//") + 2 if "//" in head else 0
    user, colon, _ = head[start:].partition(":")
    return f"{head[:start]}{user}:***@{host}" if at and colon else url
