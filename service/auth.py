"""Bearer tokens: creation, lookup, revocation and roles.

A token is `tf_` + 32 random bytes (url-safe base64). Only its SHA-256 hex digest
is stored, so a leaked database does not leak usable tokens; the plaintext is
shown once, when it is created. The digest of a 256-bit random secret needs no
salt or slow hash: there is nothing to brute-force.

Roles: `admin` sees and changes every study; `user` only their own (`owner`);
`worker` only the worker (lease) endpoints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import Forbidden, Invalid, NotFound, Unauthorized
from service.models import Role, Token, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

TOKEN_PREFIX = "tf_"
LOCAL_ADMIN_NAME = "local-admin"
LOCAL_ADMIN_OWNER = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name, the owner of what it creates, and its role."""

    token_id: int | None
    name: str
    owner: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


# What a request gets when settings.auth_disabled (local experiments only; refused in production).
ANONYMOUS_ADMIN = Principal(token_id=None, name="anonymous", owner=LOCAL_ADMIN_OWNER, role=Role.ADMIN)


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    owner: str
    role: Role
    revoked: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_label(field: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise Invalid(field, "must not be empty")
    if len(value) > 100:
        raise Invalid(field, "must be at most 100 characters")
    if not value.isprintable():
        raise Invalid(field, "must be printable text")
    return value


def parse_role(value: str | Role) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise Invalid("role", f"unknown role {value!r}; use one of: {', '.join(r.value for r in Role)}") from None


def create_token(db: Database, name: str, role: Role | str, owner: str | None = None) -> str:
    """Store a new token and return its plaintext (the only time it exists)."""
    name = _check_label("name", name)
    owner = _check_label("owner", owner if owner is not None else name)
    role = parse_role(role)
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    digest = hash_token(plaintext)

    def _add(s: Session) -> None:
        s.add(Token(name=name, owner=owner, role=role, token_hash=digest))

    db.run(_add)
    log.info("created %s token %r for owner %r", role.value, name, owner)
    return plaintext


def lookup(db: Database, token: str) -> Principal | None:
    """The active token's principal, or None for an unknown or revoked token."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    digest = hash_token(token)
    with db.scope() as s:
        row = s.scalars(select(Token).where(Token.token_hash == digest, Token.revoked_at.is_(None))).first()
        if row is None:
            return None
        return Principal(token_id=row.id, name=row.name, owner=row.owner, role=row.role)


def authenticate(db: Database, token: str | None) -> Principal:
    if not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    principal = lookup(db, token)
    if principal is None:
        raise Unauthorized("unknown or revoked token; create one with `tuneforge token create`")
    return principal


def require_role(principal: Principal, *roles: Role) -> Principal:
    if principal.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise Forbidden(f"a {principal.role.value} token cannot use this endpoint (needs: {allowed})")
    return principal


def revoke_token(db: Database, token_id: int) -> None:
    def _revoke(s: Session) -> None:
        row = s.get(Token, token_id)
        if row is None:
            raise NotFound(f"no token with id {token_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()

    db.run(_revoke)


def list_tokens(db: Database) -> list[TokenInfo]:
    with db.scope() as s:
        rows = s.scalars(select(Token).order_by(Token.id)).all()
        return [TokenInfo(r.id, r.name, r.owner, r.role, r.revoked_at is not None) for r in rows]


def ensure_local_admin(db: Database, settings: Settings) -> Path | None:
    """On a local install, keep a working admin token in `settings.admin_token_file`
    so the CLI and client authenticate without anyone copying tokens by hand.

    Returns the file if a token was written now, None if the file already held one.
    """
    if settings.environment != "local":
        return None
    path = settings.admin_token_file
    if path.is_file():
        existing = path.read_text(encoding="utf-8").strip()
        principal = lookup(db, existing) if existing else None
        if principal is not None and principal.is_admin:
            return None
    token = create_token(db, LOCAL_ADMIN_NAME, Role.ADMIN, owner=LOCAL_ADMIN_OWNER)
    write_secret(path, token)
    log.info("wrote a local admin token to %s", path)
    return path


def write_secret(path: Path, secret: str) -> None:
    """Write a file only its owner can read, created with mode 0600 (never world-readable,
    not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file left over from a crash
    os.replace(tmp, path)
