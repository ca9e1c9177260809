"""Keeping credentials out of logs, errors and reports.

A Redis URL may carry a password (`redis://:pw@host/0`, `rediss://user:pw@host/0`, `unix://:pw@/path`,
`redis://host/0?password=pw`), and redis-py exceptions or reprs can repeat parts of it. Everything a person or a
scheduler reads (log lines, error messages, JSON reports) goes through `redact_url` / `redact_text` first.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "***"
# Query parameters whose value is a secret (redis-py accepts `?password=`).
_SECRET_PARAMS = {"password", "pass", "pwd", "token", "secret"}
# `scheme://userinfo@` anywhere in a text: userinfo may hold a password, also in URLs nobody told us about.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/]+)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:" + "|".join(sorted(_SECRET_PARAMS)) + r")=)[^&#\s]+", re.IGNORECASE)


def _mask_userinfo(userinfo: str) -> str:
    """`user:pw` -> `user:***`, `:pw` -> `:***`; a lone `token` (no colon) may be a password too -> `***`."""
    user, sep, _ = userinfo.partition(":")
    return f"{user}:{MASK}" if sep else MASK


def redact_url(url: str | None) -> str | None:
    """The URL with its password (and any secret query parameter) replaced by `***`; None stays None."""
    if not url:
        return url
    text = _USERINFO.sub(lambda m: m["scheme"] + _mask_userinfo(m["userinfo"]) + "@", url)
    return _SECRET_QUERY.sub(lambda m: m["key"] + MASK, text)


def url_secrets(url: str | None) -> set[str]:
    """The secret parts of a URL, as written and percent-decoded (error messages may show either)."""
    if not url:
        return set()
    try:
        parts = urlsplit(url)
    except ValueError:
        return set()
    found: set[str] = set()
    netloc = parts.netloc
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        user, sep, password = userinfo.partition(":")
        found.add(password if sep else user)
    for key, value in parse_qsl(parts.query, keep_blank_values=False):
        if key.lower() in _SECRET_PARAMS:
            found.add(value)
    out = set()
    for secret in found:
        if secret:
            out.add(secret)
            out.add(unquote(secret))
    return out


def redact_text(text: object, *urls: str | None) -> str:
    """`text` (an exception, a message) with every URL's userinfo masked and every secret of `urls` removed."""
    out = redact_url(str(text)) or ""
    # Longest first, so that a secret containing another is removed whole.
    for secret in sorted(set().union(*(url_secrets(u) for u in urls)), key=len, reverse=True):
        out = out.replace(secret, MASK)
    return out
