"""API keys: the key file, roles, and the fingerprints that stand for keys in logs.

The key file (`--keys FILE`) has one key per line, `ROLE KEY [NAME]`:

    # role   key                                         name
    admin    2c1f6b0e0a5d4c7e9f3a8b1d6e4c2a7f5b9d0e3c    ops
    user     q7W2vN9xK4pL8sT1yB6mR3cF5hJ0dG2a            product-a

ROLE is `user` (the images and runs APIs, /metrics) or `admin` (all of that, and the
admin console and its API). KEY is at least 16 characters without spaces (e.g.
`python -c "import secrets; print(secrets.token_urlsafe(32))"`). NAME, optional, is
what logs and the console show; without one they show the key's fingerprint. Blank
lines and `#` comments are ignored. Keys are never logged: only `fingerprint()`, a
truncated SHA-256 that cannot be turned back into the key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

ROLES = ("user", "admin")
MIN_KEY_CHARS = 16


class KeyFileError(ValueError):
    def __init__(self, where: str, message: str):
        super().__init__(f"keys: {where}: {message}")
        self.where = where


@dataclass(frozen=True)
class ApiKey:
    role: str
    name: str
    fingerprint: str

    def allows(self, role: str) -> bool:
        return role == "user" or self.role == "admin"


def fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


class KeyRing:
    """Keys by the SHA-256 of their text: a lookup compares digests, never the keys."""

    def __init__(self, keys: dict[str, ApiKey]):
        self._by_digest = keys

    def __len__(self) -> int:
        return len(self._by_digest)

    def name_of(self, fingerprint: str) -> str:
        return next((k.name for k in self._by_digest.values() if k.fingerprint == fingerprint), fingerprint)

    def lookup(self, secret: str) -> ApiKey | None:
        return self._by_digest.get(hashlib.sha256(secret.encode()).hexdigest())

    @classmethod
    def parse(cls, text: str, source: str = "keys") -> KeyRing:
        keys: dict[str, ApiKey] = {}
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            where = f"{source} line {number}"  # never the line itself: it holds a key
            if len(words) not in (2, 3):
                raise KeyFileError(where, "expected ROLE KEY [NAME]")
            role, secret = words[0], words[1]
            if role not in ROLES:
                raise KeyFileError(where, f"role must be one of {ROLES}, got {role!r}")
            if len(secret) < MIN_KEY_CHARS:
                raise KeyFileError(where, f"key must be at least {MIN_KEY_CHARS} characters")
            digest = hashlib.sha256(secret.encode()).hexdigest()
            if digest in keys:
                raise KeyFileError(where, "the same key appears twice")
            fp = fingerprint(secret)
            keys[digest] = ApiKey(role, words[2] if len(words) == 3 else fp, fp)
        if not keys:
            raise KeyFileError(source, "no keys: the gateway would refuse every request")
        return cls(keys)

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise KeyFileError(str(path), f"cannot read: {exc.strerror}") from None
        return cls.parse(text, str(path))


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
