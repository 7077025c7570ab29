"""Bearer tokens: creation, lookup, revocation and roles.

A token is `tf_` + 32 random bytes (url-safe base64). Only its SHA-256 hex digest
is stored, so a leaked database does not leak usable tokens; the plaintext is
shown once, when it is created. The digest of a 256-bit random secret needs no
salt or slow hash: there is nothing to brute-force.

Roles: `admin` sees and changes every study; `user` only their own; `worker` only the
worker (lease) endpoints.

Every token belongs to a user (`tf_users`, unique names), and a study to the user
who created it: ownership compares user ids, never names. Creating a token makes a
new user and refuses a name that is taken; a further token for an existing user
must name that user explicitly (`user=`, `tuneforge token create --user NAME`), so
nobody becomes someone else by picking their name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from service.models import Role, Token, User, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

TOKEN_PREFIX = "tf_"
LOCAL_ADMIN_NAME = "local-admin"
LOCAL_ADMIN_OWNER = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name, its user's name (`owner`, for display), its role,
    and the user id that ownership checks compare.

    `user_id` is None only for the anonymous admin of auth_disabled mode, whose studies
    belong to the local admin's user (`owner_id`).
    """

    token_id: int | None
    name: str
    owner: str
    role: Role
    user_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


# What a request gets when settings.auth_disabled (local experiments only; refused in production).
ANONYMOUS_ADMIN = Principal(token_id=None, name="anonymous", owner=LOCAL_ADMIN_OWNER, role=Role.ADMIN)


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    owner: str  # the user's name
    role: Role
    revoked: bool
    user_id: int


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


def _user_named(s: Session, name: str) -> User | None:
    return s.scalars(select(User).where(User.name == name)).first()


def _taken(name: str, field: str) -> Conflict:
    return Conflict(
        f"a user named {name!r} exists already; to give that user another token pass "
        f"--user {name} (API: user={name!r}), or pick another name",
        field=field,
    )


def create_user(db: Database, name: str, *, field: str = "name") -> int:
    """A new user; Conflict when the name is taken (by anyone: names identify people)."""
    name = _check_label(field, name)

    def _add(s: Session) -> int:
        if _user_named(s, name) is not None:
            raise _taken(name, field)
        user = User(name=name)
        s.add(user)
        s.flush()
        return user.id

    try:
        return db.run(_add)
    except IntegrityError as exc:  # a concurrent create of the same name won
        raise _taken(name, field) from exc


def ensure_user(db: Database, name: str) -> int:
    """The id of the user `name`, made if missing. Only for the service's own accounts
    (the local admin, the local worker): people get `create_user`, which refuses a taken name."""
    name = _check_label("user", name)
    with db.scope() as s:
        existing = _user_named(s, name)
        if existing is not None:
            return existing.id
    try:
        return create_user(db, name, field="user")
    except Conflict:  # made meanwhile by a concurrent caller
        with db.scope() as s:
            found = _user_named(s, name)
            assert found is not None
            return found.id


def create_token(
    db: Database, name: str, role: Role | str, owner: str | None = None, *, user: str | None = None
) -> str:
    """Store a new token and return its plaintext (the only time it exists).

    `user`: the name of an existing user who gets this token (NotFound otherwise).
    Without it the token gets a new user named `owner` (default: `name`), and a name
    that is taken is a Conflict: attaching to an existing user is never implicit.
    """
    name = _check_label("name", name)
    role = parse_role(role)
    if user is not None and owner is not None:
        raise Invalid("user", "give either owner (a new user) or user (an existing one), not both")
    if user is None:
        field = "owner" if owner is not None else "name"
        user_name = _check_label(field, owner if owner is not None else name)
    else:
        field = "user"
        user_name = _check_label(field, user)
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    digest = hash_token(plaintext)

    def _add(s: Session) -> int:
        found = _user_named(s, user_name)
        if user is None:
            if found is not None:
                raise _taken(user_name, field)
            found = User(name=user_name)
            s.add(found)
            s.flush()
        elif found is None:
            raise NotFound(f"no user named {user_name!r}; leave out --user to create one", field="user")
        s.add(Token(name=name, user_id=found.id, role=role, token_hash=digest))
        return found.id

    try:
        user_id = db.run(_add)
    except IntegrityError as exc:  # a concurrent create of the same user name won
        raise _taken(user_name, field) from exc
    log.info("created %s token %r for user %r (id %s)", role.value, name, user_name, user_id)
    return plaintext


def lookup(db: Database, token: str) -> Principal | None:
    """The active token's principal, or None for an unknown or revoked token."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    digest = hash_token(token)
    with db.scope() as s:
        row = s.execute(
            select(Token.id, Token.name, Token.role, Token.user_id, User.name.label("user_name"))
            .join(User, User.id == Token.user_id)
            .where(Token.token_hash == digest, Token.revoked_at.is_(None))
        ).first()
        if row is None:
            return None
        return Principal(token_id=row.id, name=row.name, owner=row.user_name, role=row.role, user_id=row.user_id)


def authenticate(db: Database, token: str | None) -> Principal:
    if not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    principal = lookup(db, token)
    if principal is None:
        raise Unauthorized("unknown or revoked token; create one with `tuneforge token create`")
    return principal


def owner_id(db: Database, principal: Principal) -> int:
    """The user id that owns what `principal` creates."""
    if principal.user_id is not None:
        return principal.user_id
    if principal.is_admin and principal.token_id is None:
        # auth_disabled: everything belongs to the local admin, as if it used its token.
        return ensure_user(db, LOCAL_ADMIN_OWNER)
    raise Forbidden("this token belongs to no user; create a new one with `tuneforge token create`")


def owns(principal: Principal, owner_user_id: int) -> bool:
    """May `principal` see and change what user `owner_user_id` owns? Ids, never names."""
    return principal.is_admin or (principal.user_id is not None and principal.user_id == owner_user_id)


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
        rows = s.execute(select(Token, User.name).join(User, User.id == Token.user_id).order_by(Token.id)).all()
        return [TokenInfo(t.id, t.name, user, t.role, t.revoked_at is not None, t.user_id) for t, user in rows]


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
    ensure_user(db, LOCAL_ADMIN_OWNER)
    with db.scope() as s:
        # A user "admin" holding a non-admin token is the name collision users exist to
        # stop (a database from before 0002, or made outside local setup): do not hand
        # that user an admin token too.
        strangers = s.scalar(
            select(Token.id)
            .join(User, User.id == Token.user_id)
            .where(User.name == LOCAL_ADMIN_OWNER, Token.role != Role.ADMIN, Token.revoked_at.is_(None))
            .limit(1)
        )
    if strangers is not None:
        raise Conflict(
            f"user {LOCAL_ADMIN_OWNER!r} holds a non-admin token (id {strangers}); revoke it "
            "(`tuneforge token revoke`) before the local admin token is written",
            field="user",
        )
    token = create_token(db, LOCAL_ADMIN_NAME, Role.ADMIN, user=LOCAL_ADMIN_OWNER)
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
