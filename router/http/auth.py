"""API keys: `--api-key` and/or `--api-key-file` (one key per line; blank and `#` lines ignored).

A request carries `Authorization: Bearer KEY`. Every accepted key is compared on every request,
and the comparison runs on SHA-256 digests: all inputs then have the same length, so
`hmac.compare_digest` takes the same time whichever key (if any) matched and however long the
presented token is. Nothing here knows about routes; app.py decides which paths are public.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


def read_key_file(path: str | Path) -> tuple[str, ...]:
    """The keys listed in `path`. An unreadable file or one without keys is a start-up error
    (ValueError): serving with no usable key would lock everyone out, or silently let everyone in."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read --api-key-file {path}: {error}") from None
    keys = tuple(line.strip() for line in text.splitlines())
    keys = tuple(key for key in keys if key and not key.startswith("#"))
    if not keys:
        raise ValueError(f"--api-key-file {path} lists no key")
    return keys


class ApiKeys:
    __slots__ = ("_digests",)

    def __init__(self, keys: tuple[str, ...]) -> None:
        assert keys, "ApiKeys needs at least one key"
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)

    @classmethod
    def load(cls, api_key: str | None, api_key_file: str | None) -> ApiKeys | None:
        """The keys of both options together; None when neither is set (no authentication)."""
        keys = ((api_key,) if api_key else ()) + (read_key_file(api_key_file) if api_key_file else ())
        return cls(keys) if keys else None

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, authorization: str | None) -> bool:
        """True if the `Authorization` header is `Bearer <one of the keys>` (scheme case-insensitive)."""
        scheme, _, token = (authorization or "").partition(" ")
        # aiohttp hands over header bytes that are not UTF-8 as surrogate escapes: hash the bytes
        # as they came (such a token matches no key, and must not raise).
        presented = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        matched = False
        for digest in self._digests:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(presented, digest)
        return matched and scheme.lower() == "bearer"
