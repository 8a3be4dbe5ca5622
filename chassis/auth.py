"""Bearer tokens carrying roles: who the caller is (a static token from a file of hashes, or a signed
JWT), what each method needs, and the authenticated identity of the call in progress."""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from chassis.errors import InvalidArgument, PermissionDenied, Unauthenticated
from chassis.settings import ServiceSettings

log = logging.getLogger(__name__)
AUTHORIZATION = "authorization"
# Health is what load balancers and orchestrators probe, without credentials; it reveals nothing else.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Reflection describes the API: a read.
READ_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
_SHA256_HEX = 64


class Role(enum.IntEnum):
    """Roles in increasing power: each one may do what the ones below it may."""

    NONE = 0
    VIEWER = 1
    DEPLOYER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        """The role as written in token files and claims."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        """A role from its name (viewer, deployer, admin); InvalidArgument otherwise."""
        try:
            role = cls[text.strip().upper()]
        except KeyError:
            role = cls.NONE
        if role is cls.NONE:
            raise InvalidArgument(f"role: expected one of viewer, deployer, admin, got {text!r}")
        return role


@dataclass(frozen=True)
class Identity:
    """Who made the call in progress, as verified: the name to audit and the role it holds."""

    subject: str
    role: Role
    source: str  # "token-file" or "jwt"


_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("fresco_identity", default=None)
_credential: contextvars.ContextVar[str | None] = contextvars.ContextVar("fresco_credential", default=None)


def current_identity() -> Identity | None:
    """The verified identity of the call being served; None when the call carried no token (or auth is off)."""
    return _identity.get()


def forwarded_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's own credential, for a call this service makes on the caller's behalf to a sibling
    process, which verifies it again."""
    credential = _credential.get()
    return ((AUTHORIZATION, f"Bearer {credential}"),) if credential else ()


def enter_call(identity: Identity | None, credential: str | None) -> tuple[Any, Any]:
    """Make `identity` the current one for the rest of this call; the tokens `leave_call` takes."""
    return _identity.set(identity), _credential.set(credential)


def leave_call(tokens: tuple[Any, Any]) -> None:
    """Undo `enter_call`."""
    _identity.reset(tokens[0])
    _credential.reset(tokens[1])


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header; None without the header."""
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata: expected 'Bearer <token>'")
        return token.strip()
    return None


def hash_token(token: str) -> str:
    """The sha256 hex digest stored in a token file instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random static token (256 bits), safe to store only as its sha256."""
    return secrets.token_urlsafe(32)


def token_line(name: str, role: Role, token: str) -> str:
    """One line of a token file: `name:role:sha256hex`."""
    return f"{name}:{role.label}:{hash_token(token)}"


@dataclass(frozen=True)
class _Entry:
    name: str
    role: Role
    digest: bytes


class StaticTokens:
    """A file of static tokens stored as hashes, one `name:role:sha256hex` a line (`#` comments)."""

    def __init__(self, entries: Iterable[tuple[str, Role, str]]) -> None:
        self._entries = [_Entry(name, role, bytes.fromhex(digest)) for name, role, digest in entries]

    @classmethod
    def load(cls, path: Path) -> StaticTokens:
        """Read a token file; InvalidArgument naming the file and line of any malformed entry."""
        entries: list[tuple[str, Role, str]] = []
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{number}"
            parts = line.split(":")
            if len(parts) != 3 or not parts[0]:
                raise InvalidArgument(f"{where}: expected name:role:sha256hex")
            name, role_text, digest = parts
            try:
                role = Role.parse(role_text)
            except InvalidArgument as err:
                raise InvalidArgument(f"{where}: {err}") from None
            if len(digest) != _SHA256_HEX or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise InvalidArgument(f"{where}: expected the token's sha256 as 64 hex digits")
            entries.append((name, role, digest.lower()))
        return cls(entries)

    def verify(self, token: str) -> Identity | None:
        """The identity whose hash matches `token`, or None; every entry is compared in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found: _Entry | None = None
        for entry in self._entries:
            # No early exit: the time taken does not depend on which entry (if any) matches.
            if hmac.compare_digest(entry.digest, digest) and found is None:
                found = entry
        return None if found is None else Identity(found.name, found.role, "token-file")


class TokenFile:
    """A token file followed as it changes, so a token is added or revoked without a restart: its
    stat is checked at most every `check_s`; a file that cannot be read or parsed (an edit half-way)
    keeps the tokens last loaded."""

    def __init__(self, path: Path, check_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._check_s = check_s
        self._clock = clock
        self._stamp = self._stat()
        self._tokens = StaticTokens.load(path)
        self._next_check = clock() + check_s

    def _stat(self) -> tuple[int, int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def verify(self, token: str) -> Identity | None:
        """As `StaticTokens.verify`, against the file as it is now."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_s
            self._reload()
        return self._tokens.verify(token)

    def _reload(self) -> None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            tokens = StaticTokens.load(self.path)
        except (OSError, InvalidArgument) as err:
            log.warning("token file %s cannot be used; keeping the tokens loaded before: %s", self.path, err)
            return
        self._stamp, self._tokens = stamp, tokens
        log.info("token file %s reloaded", self.path)


def _algorithms_for(public_key: Any) -> list[str]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512"]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if public_key.curve.name not in by_curve:
            raise InvalidArgument(f"JWT public key: curve {public_key.curve.name} is not one of {sorted(by_curve)}")
        return [by_curve[public_key.curve.name]]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ["EdDSA"]
    raise InvalidArgument("JWT public key: expected an RSA, EC (P-256/384/521) or Ed25519 public key in PEM")


class JwtVerifier:
    """Verifies signed JWTs: the signature (HS256 with a shared secret, or RS/ES/EdDSA with a public
    key, each key only with its own algorithms), exp (required), nbf, iss, aud, and the roles claim."""

    def __init__(
        self,
        *,
        audience: str,
        secret: bytes | None = None,
        public_key_pem: bytes | None = None,
        issuer: str | None = None,
        roles_claim: str = "roles",
        leeway_s: float = 30.0,
    ) -> None:
        if secret is None and public_key_pem is None:
            raise InvalidArgument("JWT verification needs a shared secret or a public key")
        self._keys: dict[str, Any] = {}
        if secret is not None:
            if len(secret) < 32:
                raise InvalidArgument(
                    "JWT secret: expected at least 32 bytes (HS256 keys shorter than the hash are weak)"
                )
            self._keys["HS256"] = secret
        if public_key_pem is not None:
            try:
                public_key = serialization.load_pem_public_key(public_key_pem)
            except ValueError as err:
                raise InvalidArgument(f"JWT public key: not a PEM public key ({err})") from None
            for algorithm in _algorithms_for(public_key):
                self._keys[algorithm] = public_key
        self._audience = audience
        self._issuer = issuer
        self._roles_claim = roles_claim
        self._leeway_s = leeway_s

    def verify(self, token: str) -> Identity:
        """The identity a valid token names; Unauthenticated saying what is wrong with any other."""
        try:
            algorithm = str(jwt.get_unverified_header(token).get("alg"))
        except jwt.InvalidTokenError:
            raise Unauthenticated("bearer token: not a token this service knows") from None
        # Each key only with its own algorithms: a public key is never taken for an HMAC secret.
        key = self._keys.get(algorithm)
        if key is None:
            raise Unauthenticated(
                f"bearer token: algorithm {algorithm!r} is not accepted; expected {sorted(self._keys)}"
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("bearer token: expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("bearer token: not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"bearer token: audience is not {self._audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"bearer token: issuer is not {self._issuer!r}") from None
        except jwt.MissingRequiredClaimError as err:
            raise Unauthenticated(f"bearer token: claim {err.claim!r} is missing") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bearer token: signature does not verify") from None
        except jwt.InvalidTokenError as err:
            raise Unauthenticated(f"bearer token: invalid ({type(err).__name__})") from None
        return Identity(str(claims["sub"]), self._role(claims.get(self._roles_claim)), "jwt")

    def _role(self, claim: object) -> Role:
        """The highest known role a claim names (a string or a list); NONE when it names none."""
        names: list[object] = [claim] if isinstance(claim, str) else claim if isinstance(claim, list) else []
        roles = [Role[n.upper()] for n in names if isinstance(n, str) and n.upper() in Role.__members__]
        return max(roles, default=Role.NONE)


class Authenticator:
    """Turns a bearer token into an identity, trying the static token file, then JWTs."""

    def __init__(self, static: StaticTokens | TokenFile | None = None, jwts: JwtVerifier | None = None) -> None:
        self._static = static
        self._jwts = jwts

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Authenticator | None:
        """The token sources the settings configure; None when there are none (auth off)."""
        if not settings.auth_enabled:
            return None
        static = TokenFile(settings.auth_tokens_file) if settings.auth_tokens_file else None
        jwts = None
        secret_file, public_key_file = settings.auth_jwt_secret_file, settings.auth_jwt_public_key_file
        if secret_file is not None or public_key_file is not None:
            jwts = JwtVerifier(
                audience=settings.auth_jwt_audience or "",
                secret=secret_file.read_bytes().strip() if secret_file else None,
                public_key_pem=public_key_file.read_bytes() if public_key_file else None,
                issuer=settings.auth_jwt_issuer,
                roles_claim=settings.auth_jwt_roles_claim,
                leeway_s=settings.auth_jwt_leeway_s,
            )
        return cls(static, jwts)

    def authenticate(self, token: str) -> Identity:
        """The token's identity; Unauthenticated for a token no source accepts."""
        if self._static is not None:
            identity = self._static.verify(token)
            if identity is not None:
                return identity
        if self._jwts is not None and token.count(".") == 2:
            return self._jwts.verify(token)
        raise Unauthenticated("bearer token: not a token this service knows")


def method_roles(
    service: Any, writes: Mapping[str, Role], reads: Collection[str], open_methods: Collection[str] = ()
) -> dict[str, Role | None]:
    """A service's table by full method path: each write with its role, each read None. Every method of
    the service descriptor must be listed exactly once, so a new method cannot go unguarded."""
    names = {method.name for method in service.methods}
    listed = [*writes, *reads, *open_methods]
    if sorted(listed) != sorted(names):
        missing, extra = names - set(listed), set(listed) - names
        raise ValueError(
            f"{service.full_name} role table: unlisted {sorted(missing)}, unknown or repeated {sorted(extra)}"
        )
    table: dict[str, Role | None] = {f"/{service.full_name}/{name}": None for name in reads}
    table.update({f"/{service.full_name}/{name}": role for name, role in writes.items()})
    table.update({f"/{service.full_name}/{name}": Role.NONE for name in open_methods})
    return table


class AccessPolicy:
    """The role each method needs. Reads (None in the table) need none, or viewer when reads require
    auth; open methods (Role.NONE, and health) never need one; unlisted methods need admin."""

    def __init__(self, table: Mapping[str, Role | None], require_for_reads: bool = False) -> None:
        self._table = dict(table)
        self._read_role = Role.VIEWER if require_for_reads else Role.NONE

    def required(self, method: str) -> Role:
        """The least role allowed to call `method` (Role.NONE: anyone, even without a token)."""
        if method.startswith(OPEN_PREFIXES):
            return Role.NONE
        if method.startswith(READ_PREFIXES):
            return self._read_role
        if method not in self._table:
            return Role.ADMIN
        role = self._table[method]
        return self._read_role if role is None else role

    def check(self, method: str, identity: Identity | None) -> None:
        """Unauthenticated or PermissionDenied, naming the role needed, unless `identity` may call `method`."""
        needed = self.required(method)
        if needed is Role.NONE:
            return
        if identity is None:
            raise Unauthenticated(f"{method} needs a bearer token with role {needed.label} or higher; none was sent")
        if identity.role < needed:
            raise PermissionDenied(
                f"{method} needs role {needed.label} or higher; {identity.subject!r} has {identity.role.label}"
            )
