"""Authentication for the runtime: API keys, JWTs, cluster signatures.

Nothing here reads a clock or keeps global state: every check that depends on
time takes ``now`` (UNIX seconds), so tests drive a hand-advanced clock and the
gateway / orchestrator pass ``time.time()``. The only I/O is
:meth:`Keyring.from_dir`; the only randomness is key / nonce generation.

Threat model
============

*Clients -> gateway.* Anyone on the network can reach the gateway. A caller
proves a tenant with either an **API key** (``Authorization: Bearer <key>`` or
``x-api-key: <key>``) or a **JWT** from the configured issuer
(``Authorization: Bearer <jwt>``). Everything the caller sends is hostile until
verified:

- API keys are 256-bit random strings (:func:`generate_api_key`). The store
  keeps only ``sha256(key)`` (:func:`hash_api_key`), so a leaked database does
  not leak usable keys. A fast unsalted hash is the right tool *because* the
  keys are high-entropy: brute-forcing 2**256 candidates is infeasible at any
  hash speed, and a deterministic digest allows an indexed lookup
  (``tenant_for_key(key_hash)``), which a salted slow KDF (bcrypt / argon2,
  meant for low-entropy *passwords*) would not, while costing every request
  tens of milliseconds. GitHub (token scanning) and Stripe store API tokens the
  same way. Never use this hash for user-chosen passwords. Looking a key up by
  its digest leaks nothing useful through timing: an attacker learns at most
  whether some digest prefix exists, which needs a SHA-256 preimage to
  exploit. :func:`constant_time_equal` is there for comparing secrets directly.
- JWTs (pyjwt) are checked against *configuration*, never against what the
  token claims about itself (RFC 8725): the ``alg`` in the unverified header
  must be in :attr:`JwtConfig.algorithms` *and* match the configured key's
  type (an RSA / EC / Ed25519 public key admits only its own signature
  family, an HMAC secret only ``HS*``), so ``alg: none`` and the HS256-with-
  the-RSA-public-key confusion are refused before pyjwt sees the token.
  ``crit`` and ``b64`` headers are refused; ``jku`` / ``x5u`` / ``jwk`` /
  ``kid`` are ignored (keys are never fetched from a token). ``exp`` is
  required; ``exp`` / ``nbf`` / ``iat`` are checked here against ``now`` with
  :attr:`JwtConfig.leeway_s`; ``aud`` and ``iss`` must match. The tenant claim
  must be a non-empty string without control characters.
- Failures raise :class:`AuthError`: 401 when the credential is missing,
  malformed, unknown, expired or forged; 403 when it is valid but not allowed
  (:func:`require_scope`, :func:`require_tenant`). Messages say what was wrong
  with the credential, never echo secrets.

*Service -> service (gateway, orchestrator, workers).* The cluster network is
not trusted either (no mTLS assumed). Each process holds an Ed25519
:class:`Signer`; every process trusts the public keys in its
:class:`Keyring` (``*.pub`` PEM files, identified by ``key_id``: the first 16
hex chars of SHA-256 of the raw 32-byte public key). An RPC body or a worker
announcement travels with a **seal** (:func:`seal` / :func:`open_sealed`):

- The signature covers a domain-separated canonical byte string: the msgpack
  array ``["haif-seal-v1", kid, float(iat), float(exp), nonce, aud,
  sha256(body)]``. Seal everything the recipient acts on: for RPC
  (:mod:`haif.runtime.rpc`) that is the msgpack array of the method name,
  message id, trace context and body, which the server re-packs from what it
  decoded (msgpack re-packs its own output byte for byte), so nothing in the
  body or the seal can be changed, swapped or re-targeted to another method.
- A key's name in the keyring (its file's stem) says whose it is: the
  orchestrator accepts an announcement for worker id ``W`` only when it is
  sealed with the key named ``W``, so one worker's key cannot announce
  (and draw traffic to) another worker id.
- ``exp - iat`` is bounded (``max_ttl_s``), and a seal is valid from ``iat -
  skew_s`` until ``exp + skew_s``: a captured message is useless after that.
- Within the window, a :class:`ReplayCache` remembers ``(kid, nonce)`` until
  the seal's end of validity, so a message is accepted once. The cache is
  per process: to stop a message captured on its way to worker A from being
  replayed to worker B, bind the recipient with ``audience=`` on both sides.
  The cache is filled only after the signature verified, so only holders of a
  trusted key can fill it; when full it fails closed (503).
- The checks run in the order structure -> key -> signature -> audience ->
  time -> replay, so "expired" or "replayed" is only reported for authentic
  messages.

*Artifacts.* Model manifests are signed with the same Ed25519 keys over the
canonical JSON (``sort_keys``, compact separators, ASCII, no NaN) of the
manifest plus its ``kid``, prefixed with ``b"haif-manifest-v1\\x00"`` so a
manifest signature can never pass as a seal or the reverse.

Encodings: signatures are unpadded base64url strings; the seal dict holds
only ``str`` and ``float`` so it travels in msgpack, JSON or an HTTP header
(:func:`encode_seal_header` / :func:`decode_seal_header`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt as pyjwt
import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509 import load_pem_x509_certificate

__all__ = [
    "DEFAULT_ALGORITHMS",
    "SEAL_HEADER",
    "AuthError",
    "JwtConfig",
    "Keyring",
    "Principal",
    "ReplayCache",
    "Signer",
    "authenticate",
    "constant_time_equal",
    "decode_seal_header",
    "encode_seal_header",
    "generate_api_key",
    "generate_keypair",
    "hash_api_key",
    "is_issued_credential",
    "issued_credentials",
    "key_id_of",
    "open_sealed",
    "require_scope",
    "require_tenant",
    "seal",
    "sign_manifest",
    "verify_jwt",
    "verify_manifest",
]

DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA", "HS256")
#: HTTP header that carries a seal (see :func:`encode_seal_header`).
SEAL_HEADER = "x-haif-seal"
#: Scope held by API-key principals: an API key acts for its whole tenant.
ALL_SCOPES = "*"

MAX_TOKEN_CHARS = 16_384
MAX_API_KEY_CHARS = 512
MAX_TENANT_CHARS = 256
MAX_NONCE_CHARS = 128
DEFAULT_SKEW_S = 5.0
DEFAULT_MAX_TTL_S = 300.0

_SEAL_DOMAIN = "haif-seal-v1"
_MANIFEST_DOMAIN = b"haif-manifest-v1\x00"
_SIG_BYTES = 64
_KEY_ID_CHARS = 16

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*={0,2}")
_API_KEY_SHAPE = re.compile(rf"[\x21-\x7e]{{1,{MAX_API_KEY_CHARS}}}")
#: What :func:`generate_api_key` makes: ``<prefix>-<43 base64url chars>``.
_ISSUED_KEY_SHAPE = re.compile(r"[A-Za-z0-9_]{1,32}-[A-Za-z0-9_-]{43}")
_PREFIX_SHAPE = re.compile(r"[A-Za-z0-9_]{1,32}")
_NONCE_SHAPE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NONCE_CHARS}}}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_BY_CURVE: dict[type[ec.EllipticCurve], str] = {
    ec.SECP256R1: "ES256",
    ec.SECP384R1: "ES384",
    ec.SECP521R1: "ES512",
}
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_KNOWN_ALGS = _RSA_ALGS | set(_EC_ALG_BY_CURVE.values()) | {"EdDSA"} | set(_HMAC_MIN_BYTES)


# --------------------------------------------------------------------- errors


class AuthError(Exception):
    """A refused credential: ``status`` 401 (not authenticated) or 403 (not allowed)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def to_error_body(self) -> dict[str, Any]:
        """The OpenAI-shaped error JSON for this refusal."""
        kind = "permission_error" if self.status == 403 else "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}


def _unauthorized(code: str, message: str) -> AuthError:
    return AuthError(401, code, message)


def _check_now(now: float) -> None:
    # A NaN clock would make every "now >= exp" comparison false: fail loudly.
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite UNIX time, got {now!r}")


# ------------------------------------------------------------------ principal


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant it acts for, its subject and scopes.

    ``expires_at`` is the credential's expiry (a JWT's ``exp``); ``None`` for
    API keys, which are valid until revoked. API-key principals have subject
    ``api-key:<first 12 hex of the key hash>`` and scopes ``("*",)``: a key
    acts for its whole tenant (a JWT granting ``*`` does the same). A JWT's
    scopes come from its ``scope`` (space-separated) and ``scp`` (list) claims.
    """

    tenant: str
    subject: str
    scopes: tuple[str, ...]
    expires_at: float | None

    def has_scope(self, scope: str) -> bool:
        return ALL_SCOPES in self.scopes or scope in self.scopes


def require_scope(principal: Principal, *scopes: str) -> None:
    """Raise 403 ``missing_scope`` unless ``principal`` holds every one of ``scopes``."""
    missing = [s for s in scopes if not principal.has_scope(s)]
    if missing:
        raise AuthError(403, "missing_scope", f"credential lacks scope(s): {' '.join(missing)}")


def require_tenant(principal: Principal, tenant: str) -> None:
    """Raise 403 ``tenant_mismatch`` unless ``principal`` acts for ``tenant``."""
    if not constant_time_equal(principal.tenant, tenant):
        raise AuthError(403, "tenant_mismatch", "credential does not belong to this tenant")


# ------------------------------------------------------------------- api keys


def generate_api_key(prefix: str = "haif") -> str:
    """A new API key ``<prefix>-<43 base64url chars>`` (256 random bits).

    The prefix (letters, digits, ``_``) makes leaked keys easy to scan for;
    keys never contain a dot, so they are never mistaken for a JWT.
    """
    if not _PREFIX_SHAPE.fullmatch(prefix):
        raise ValueError(f"API key prefix must match {_PREFIX_SHAPE.pattern}, got {prefix!r}")
    return f"{prefix}-{secrets.token_urlsafe(32)}"


def hash_api_key(key: str) -> str:
    """SHA-256 hex digest of ``key`` (UTF-8): what the store keeps and looks up.

    A fast unsalted hash is deliberate (see the module docstring): API keys
    carry 256 random bits, so the digest cannot be brute-forced, and it must
    be deterministic to be looked up by index.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets without a timing side channel (any Unicode allowed).

    Lone surrogates are compared too (``surrogatepass``): HTTP headers that
    are not UTF-8 reach the gateway with them (``surrogateescape``).
    """
    a_bytes = a.encode("utf-8", "surrogatepass") if isinstance(a, str) else a
    b_bytes = b.encode("utf-8", "surrogatepass") if isinstance(b, str) else b
    return hmac.compare_digest(a_bytes, b_bytes)


# ------------------------------------------------------------------------ jwt


def _load_jwt_key(key: str | bytes) -> tuple[Any, frozenset[str]]:
    """``(verification key, algorithms that key admits)``; refuses private keys."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    stripped = raw.strip()
    if stripped.startswith(b"-----BEGIN"):
        if b"PRIVATE KEY-----" in stripped:
            raise ValueError("JwtConfig.key must be a public key, not a private key")
        try:
            if b"CERTIFICATE-----" in stripped:
                public: Any = load_pem_x509_certificate(stripped).public_key()
            else:
                public = serialization.load_pem_public_key(stripped)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"JwtConfig.key is not a usable PEM public key: {exc}") from None
        if isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise ValueError(f"RSA key of {public.key_size} bits; at least 2048 required")
            return public, _RSA_ALGS
        if isinstance(public, ec.EllipticCurvePublicKey):
            alg = _EC_ALG_BY_CURVE.get(type(public.curve))
            if alg is None:
                raise ValueError(f"unsupported EC curve {public.curve.name}")
            return public, frozenset({alg})
        if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return public, frozenset({"EdDSA"})
        raise ValueError(f"unsupported public key type {type(public).__name__}")
    if not raw:
        raise ValueError("JwtConfig.key is empty")
    return raw, frozenset(a for a, n in _HMAC_MIN_BYTES.items() if len(raw) >= n)


@dataclass(frozen=True)
class JwtConfig:
    """How to verify bearer JWTs: the trusted issuer, audience and key.

    ``key`` is a PEM public key (or certificate) for RS*/PS*/ES*/EdDSA, or an
    HMAC secret (at least 32 bytes) for HS*. The algorithms actually accepted
    are ``algorithms`` intersected with those the key's type admits; an empty
    intersection is a configuration error (``ValueError``).
    """

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    key: str | bytes = field(default=b"", repr=False)
    tenant_claim: str = "tenant"
    leeway_s: float = 30.0
    _verify_key: Any = field(init=False, repr=False, compare=False)
    _allowed: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("JwtConfig needs a non-empty issuer and audience")
        unknown = [a for a in self.algorithms if a not in _KNOWN_ALGS]
        if unknown:
            raise ValueError(
                f"unsupported JWT algorithm(s) {unknown}; known: {sorted(_KNOWN_ALGS)}"
            )
        if not (math.isfinite(self.leeway_s) and self.leeway_s >= 0):
            raise ValueError(f"leeway_s must be finite and >= 0, got {self.leeway_s}")
        verify_key, admitted = _load_jwt_key(self.key)
        allowed = frozenset(self.algorithms) & admitted
        if not allowed:
            raise ValueError(
                f"none of the algorithms {self.algorithms} fit the configured key "
                f"(it admits {sorted(admitted)})"
            )
        object.__setattr__(self, "_verify_key", verify_key)
        object.__setattr__(self, "_allowed", allowed)

    @property
    def allowed_algorithms(self) -> frozenset[str]:
        """The algorithms a token may use with this config's key."""
        return self._allowed


def _unverified_header(token: str) -> dict[str, Any]:
    head = token.split(".", 1)[0].rstrip("=")
    if not head or not _B64URL.fullmatch(head) or len(head) % 4 == 1:
        raise _unauthorized("invalid_token", "malformed JWT header")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise _unauthorized("invalid_token", "malformed JWT header") from None
    if not isinstance(header, dict):
        raise _unauthorized("invalid_token", "JWT header is not an object")
    return header


def _number(payload: Mapping[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _unauthorized("invalid_token", f"claim {claim!r} is not a finite number")
    return float(value)


def _scopes(payload: Mapping[str, Any]) -> tuple[str, ...]:
    """OAuth scopes from ``scope`` (space-separated, RFC 9068) and/or ``scp`` (list)."""
    found: list[str] = []
    for claim in ("scope", "scp"):
        value = payload.get(claim)
        if value is None:
            continue
        if isinstance(value, str):
            found += value.split()
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            found += value
        else:
            raise _unauthorized("invalid_token", f"claim {claim!r} must be a string or list")
    return tuple(dict.fromkeys(found))


def _valid_tenant(value: Any) -> str | None:
    if (
        isinstance(value, str)
        and value.strip()
        and value == value.strip()
        and len(value) <= MAX_TENANT_CHARS
        and not _CONTROL.search(value)
    ):
        return value
    return None


def verify_jwt(token: str, config: JwtConfig, now: float) -> Principal:
    """Verify ``token`` against ``config`` at time ``now``; raise :class:`AuthError` (401)."""
    _check_now(now)
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise _unauthorized("invalid_token", "JWT missing or too long")
    if token.count(".") != 2:
        raise _unauthorized("invalid_token", "a JWT has three dot-separated parts")
    header = _unverified_header(token)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in config.allowed_algorithms:
        raise _unauthorized("alg_not_allowed", f"JWT algorithm {alg!r} is not allowed")
    if "crit" in header or "b64" in header:
        raise _unauthorized("invalid_token", "JWT critical header extensions are not supported")
    try:
        payload = pyjwt.decode(
            token,
            key=config._verify_key,
            algorithms=[alg],
            audience=config.audience,
            issuer=config.issuer,
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": True,
                "verify_iss": True,
                "require": ["exp"],
                "enforce_minimum_key_length": True,
            },
        )
    except pyjwt.InvalidSignatureError:
        raise _unauthorized("invalid_token", "JWT signature verification failed") from None
    except pyjwt.InvalidAlgorithmError:
        raise _unauthorized("alg_not_allowed", f"JWT algorithm {alg!r} is not allowed") from None
    except pyjwt.InvalidAudienceError:
        raise _unauthorized("invalid_audience", "JWT audience does not match") from None
    except pyjwt.InvalidIssuerError:
        raise _unauthorized("invalid_issuer", "JWT issuer does not match") from None
    except pyjwt.MissingRequiredClaimError as exc:
        code = {"aud": "invalid_audience", "iss": "invalid_issuer"}.get(exc.claim, "invalid_token")
        raise _unauthorized(code, f"JWT lacks the {exc.claim!r} claim") from None
    except pyjwt.PyJWTError as exc:
        raise _unauthorized("invalid_token", f"JWT rejected: {type(exc).__name__}") from None

    # Authentic from here on; time checks against the caller's clock.
    leeway = config.leeway_s
    exp = _number(payload, "exp")
    if exp is None:
        raise _unauthorized("invalid_token", "JWT lacks the 'exp' claim")
    if now >= exp + leeway:
        raise _unauthorized("token_expired", "JWT has expired")
    nbf = _number(payload, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise _unauthorized("token_not_yet_valid", "JWT is not valid yet (nbf)")
    iat = _number(payload, "iat")
    if iat is not None and iat > now + leeway:
        raise _unauthorized("token_not_yet_valid", "JWT was issued in the future (iat)")

    tenant = _valid_tenant(payload.get(config.tenant_claim))
    if tenant is None:
        raise _unauthorized(
            "invalid_tenant", f"JWT claim {config.tenant_claim!r} must be a non-empty string"
        )
    subject = payload.get("sub", "")
    if not isinstance(subject, str):
        raise _unauthorized("invalid_token", "JWT 'sub' must be a string")
    return Principal(tenant=tenant, subject=subject, scopes=_scopes(payload), expires_at=exp)


# -------------------------------------------------------------- authenticate


def _bearer(authorization: str) -> str:
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise _unauthorized("invalid_credentials", "Authorization must use the Bearer scheme")
    token = credentials.strip()
    if not token:
        raise _unauthorized("missing_credentials", "empty Bearer token")
    return token


async def _api_key_principal(
    key: str, lookup_key: Callable[[str], Awaitable[str | None]]
) -> Principal:
    if not _API_KEY_SHAPE.fullmatch(key):
        raise _unauthorized("invalid_api_key", "malformed API key")
    key_hash = hash_api_key(key)
    tenant = await lookup_key(key_hash)
    if tenant is None:
        raise _unauthorized("invalid_api_key", "unknown or revoked API key")
    return Principal(
        tenant=tenant, subject=f"api-key:{key_hash[:12]}", scopes=(ALL_SCOPES,), expires_at=None
    )


def is_issued_credential(token: str) -> bool:
    """Whether ``token`` has the shape of a credential HAIF issues or verifies.

    That is an API key as :func:`generate_api_key` makes them
    (``<prefix>-<43 base64url chars>``) or a JWT (three dot-separated
    base64url parts). Says nothing about validity: only that the caller
    meant to present a HAIF credential rather than a placeholder (the OpenAI
    SDK insists on *some* key: ``"unused"``, ``"EMPTY"``, ``"sk-..."``).
    """
    return bool(_ISSUED_KEY_SHAPE.fullmatch(token) or _JWT_SHAPE.fullmatch(token))


def issued_credentials(
    authorization_header: str | None, x_api_key: str | None
) -> tuple[str | None, str | None]:
    """The two credential headers, each kept only if it carries an issued credential.

    For a gateway where authentication is optional: there a request without
    a credential acts anonymously, and so does one whose headers hold only
    placeholders (:func:`is_issued_credential` false, or another scheme than
    ``Bearer``). What is kept goes to :func:`authenticate`, which fails
    closed: an API key or JWT that is presented and invalid (unknown,
    revoked, expired, forged) is refused with 401 whether or not
    authentication is required.
    """
    authorization = (authorization_header or "").strip()
    scheme, _, token = authorization.partition(" ")
    kept_authorization = (
        authorization
        if scheme.lower() == "bearer" and is_issued_credential(token.strip())
        else None
    )
    api_key = (x_api_key or "").strip()
    kept_key = api_key if is_issued_credential(api_key) else None
    return kept_authorization, kept_key


async def authenticate(
    authorization_header: str | None,
    x_api_key: str | None,
    *,
    lookup_key: Callable[[str], Awaitable[str | None]],
    jwt: JwtConfig | None,
    now: float,
) -> Principal:
    """Authenticate a gateway request from its ``Authorization`` / ``x-api-key`` headers.

    ``Authorization: Bearer <token>``: a token shaped like a JWT (three
    dot-separated base64url parts) is verified with ``jwt`` (401 when no JWT
    config is set); any other token is an API key. ``x-api-key: <key>`` is
    always an API key. API keys are looked up by :func:`hash_api_key` through
    ``lookup_key`` (e.g. ``store.tenant_for_key``), which returns the tenant
    or ``None`` for unknown / revoked keys; its own errors (store down)
    propagate. When both headers are sent they must carry the same key,
    otherwise the request is refused (``ambiguous_credentials``).
    """
    authorization = (authorization_header or "").strip()
    api_key = (x_api_key or "").strip()
    if not authorization and not api_key:
        raise _unauthorized("missing_credentials", "send Authorization: Bearer <key> or x-api-key")
    if authorization:
        token = _bearer(authorization)
        if api_key and not constant_time_equal(token, api_key):
            raise _unauthorized(
                "ambiguous_credentials", "Authorization and x-api-key carry different credentials"
            )
        if _JWT_SHAPE.fullmatch(token):
            if jwt is None:
                raise _unauthorized("invalid_token", "JWT authentication is not enabled")
            return verify_jwt(token, jwt, now)
        return await _api_key_principal(token, lookup_key)
    return await _api_key_principal(api_key, lookup_key)


# -------------------------------------------------------------------- keyring


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    """Strict unpadded base64url: refuses padding, junk and non-canonical trailing bits."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64e(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _raw_public(public: ed25519.Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key_id(public: ed25519.Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:_KEY_ID_CHARS]


def _load_ed25519_public(public_pem: bytes | str) -> ed25519.Ed25519PublicKey:
    pem = public_pem.encode("ascii") if isinstance(public_pem, str) else public_pem
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise ValueError(f"cluster keys are Ed25519, got {type(public).__name__}")
    return public


def key_id_of(public_pem: bytes | str) -> str:
    """The key id of an Ed25519 public key: first 16 hex of SHA-256 of its raw bytes."""
    return _key_id(_load_ed25519_public(public_pem))


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as ``(private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)``."""
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


class Keyring:
    """Trusted Ed25519 public keys by key id, each optionally named.

    A key's *name* says whose it is: :meth:`from_dir` names each key after
    its file (``w1.pub`` -> ``"w1"``). The orchestrator accepts a worker's
    announcement only under the key named after that worker's id.
    """

    def __init__(self, public_pems: Iterable[bytes | str] = ()) -> None:
        self._keys: dict[str, ed25519.Ed25519PublicKey] = {}
        self._names: dict[str, str] = {}
        for pem in public_pems:
            self.add(pem)

    @classmethod
    def from_dir(cls, path: str | Path) -> Keyring:
        """Trust every ``*.pub`` PEM file in ``path``, named by its (percent-decoded) stem.

        A file that is not an Ed25519 public key is a ``ValueError`` naming it.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"keyring directory {directory} does not exist")
        ring = cls()
        for file in sorted(directory.glob("*.pub")):
            try:
                ring.add(file.read_bytes(), name=unquote(file.stem))
            except ValueError as exc:
                raise ValueError(f"{file}: {exc}") from None
        return ring

    def add(self, public_pem: bytes | str, name: str | None = None) -> str:
        """Trust ``public_pem`` (as ``name``, if given); return its key id.

        Adding a key twice is harmless; a later ``name`` replaces an earlier one.
        """
        public = _load_ed25519_public(public_pem)
        kid = _key_id(public)
        self._keys[kid] = public
        if name is not None:
            self._names[kid] = name
        return kid

    def remove(self, key_id: str) -> bool:
        """Stop trusting ``key_id`` (rotation / compromise); True if it was trusted."""
        self._names.pop(key_id, None)
        return self._keys.pop(key_id, None) is not None

    def get(self, key_id: str) -> ed25519.Ed25519PublicKey | None:
        return self._keys.get(key_id)

    def name_of(self, key_id: str) -> str | None:
        """The name ``key_id`` was trusted under (its file's stem), or ``None``."""
        return self._names.get(key_id) if key_id in self._keys else None

    def verify(self, key_id: str, signature: bytes, payload: bytes) -> bool:
        """True iff ``key_id`` is trusted and ``signature`` is its signature of ``payload``."""
        public = self._keys.get(key_id)
        if public is None:
            return False
        try:
            public.verify(signature, payload)
        except InvalidSignature:
            return False
        return True

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Keyring({list(self.key_ids)})"


class Signer:
    """An Ed25519 private key and its key id. ``repr`` never shows the key."""

    def __init__(self, private_pem: bytes | str) -> None:
        pem = private_pem.encode("ascii") if isinstance(private_pem, str) else private_pem
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise ValueError(f"cluster keys are Ed25519, got {type(private).__name__}")
        self._private = private
        self.key_id = _key_id(private.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        return cls(Path(path).read_bytes())

    @property
    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, payload: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``payload``."""
        return self._private.sign(payload)

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id!r})"


# ------------------------------------------------------------------ envelopes


class ReplayCache:
    """Remembers ``(kid, nonce)`` pairs until they expire; no clock, ``now`` is passed in.

    Bounded by ``max_entries``: when full of unexpired entries it refuses new
    ones (``AuthError(503, "replay_cache_full")``) instead of forgetting one,
    which would reopen a replay window.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def prune(self, now: float) -> int:
        """Forget entries whose ``expires_at <= now``; return how many were dropped."""
        dropped = 0
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]
                dropped += 1
        return dropped

    def check_and_add(self, kid: str, nonce: str, expires_at: float, now: float) -> bool:
        """Record ``(kid, nonce)`` until ``expires_at``; False if it is already recorded."""
        self.prune(now)
        key = (kid, nonce)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self.max_entries:
            raise AuthError(503, "replay_cache_full", "too many messages in flight; retry later")
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._expiry

    def __len__(self) -> int:
        return len(self._expiry)


def _seal_payload(
    body: bytes, kid: str, iat: float, exp: float, nonce: str, audience: str
) -> bytes:
    fields = [_SEAL_DOMAIN, kid, float(iat), float(exp), nonce, audience]
    packed: bytes = msgpack.packb([*fields, hashlib.sha256(body).digest()], use_bin_type=True)
    return packed


def seal(
    body_bytes: bytes,
    signer: Signer,
    now: float,
    ttl_s: float = 30.0,
    nonce: str | None = None,
    *,
    audience: str = "",
) -> dict[str, Any]:
    """Sign ``body_bytes``: ``{"kid", "iat", "exp", "nonce", "sig"}`` (+ ``"aud"`` if given).

    Valid from ``now`` for ``ttl_s`` seconds; ``nonce`` defaults to 128
    random bits. ``audience`` names the intended recipient (e.g. a worker id
    or the orchestrator); :func:`open_sealed` must be given the same one.
    """
    if not (math.isfinite(now) and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"need a finite now and ttl_s > 0, got now={now}, ttl_s={ttl_s}")
    nonce = secrets.token_urlsafe(16) if nonce is None else nonce
    if not _NONCE_SHAPE.fullmatch(nonce):
        raise ValueError(f"nonce must match {_NONCE_SHAPE.pattern}")
    iat, exp = float(now), float(now) + float(ttl_s)
    payload = _seal_payload(body_bytes, signer.key_id, iat, exp, nonce, audience)
    auth: dict[str, Any] = {
        "kid": signer.key_id,
        "iat": iat,
        "exp": exp,
        "nonce": nonce,
        "sig": _b64e(signer.sign(payload)),
    }
    if audience:
        auth["aud"] = audience
    return auth


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def open_sealed(
    body_bytes: bytes,
    auth: Mapping[str, Any] | None,
    keyring: Keyring,
    now: float,
    replay: ReplayCache | None = None,
    *,
    audience: str = "",
    skew_s: float = DEFAULT_SKEW_S,
    max_ttl_s: float = DEFAULT_MAX_TTL_S,
) -> str:
    """Verify the seal ``auth`` of ``body_bytes`` at ``now``; return the signer's key id.

    Raises ``AuthError(401, code)`` with ``code`` one of ``unsigned`` (no or
    incomplete seal), ``invalid_seal`` (malformed fields or a validity window
    longer than ``max_ttl_s``), ``unknown_key``, ``bad_signature`` (forged,
    or body / any field changed), ``wrong_audience``, ``expired`` (outside
    ``[iat - skew_s, exp + skew_s)``) or ``replayed`` (nonce already seen by
    ``replay``), and ``AuthError(503, "replay_cache_full")``.
    """
    _check_now(now)
    if not auth or not isinstance(auth, Mapping):
        raise _unauthorized("unsigned", "message is not signed")
    missing = [k for k in ("kid", "iat", "exp", "nonce", "sig") if k not in auth]
    if missing:
        raise _unauthorized("unsigned", f"seal lacks {', '.join(missing)}")
    kid, nonce, sig_text = auth["kid"], auth["nonce"], auth["sig"]
    claimed_audience = auth.get("aud", "")
    iat, exp = _finite(auth["iat"]), _finite(auth["exp"])
    if (
        not isinstance(kid, str)
        or not isinstance(nonce, str)
        or not _NONCE_SHAPE.fullmatch(nonce)
        or not isinstance(claimed_audience, str)
        or iat is None
        or exp is None
    ):
        raise _unauthorized("invalid_seal", "malformed seal fields")
    if not exp > iat or exp - iat > max_ttl_s:
        raise _unauthorized("invalid_seal", f"seal validity must be within (0, {max_ttl_s}] s")
    if kid not in keyring:
        raise _unauthorized("unknown_key", f"key {kid[:32]!r} is not trusted")
    try:
        signature = _b64d(sig_text) if isinstance(sig_text, str) else b""
    except ValueError:
        signature = b""
    if len(signature) != _SIG_BYTES:
        raise _unauthorized("bad_signature", "malformed signature")
    payload = _seal_payload(body_bytes, kid, iat, exp, nonce, claimed_audience)
    if not keyring.verify(kid, signature, payload):
        raise _unauthorized("bad_signature", "signature does not match the message")
    if not constant_time_equal(claimed_audience, audience):
        raise _unauthorized("wrong_audience", "message was sealed for another recipient")
    if now < iat - skew_s:
        raise _unauthorized("expired", "seal is not valid yet (clock skew?)")
    if now >= exp + skew_s:
        raise _unauthorized("expired", "seal has expired")
    if replay is not None and not replay.check_and_add(kid, nonce, exp + skew_s, now):
        raise _unauthorized("replayed", "message was already received")
    return kid


def encode_seal_header(auth: Mapping[str, Any]) -> str:
    """A seal as a compact JSON string for the :data:`SEAL_HEADER` HTTP header."""
    return json.dumps(dict(auth), sort_keys=True, separators=(",", ":"), allow_nan=False)


def decode_seal_header(value: str | None) -> dict[str, Any] | None:
    """Inverse of :func:`encode_seal_header`; ``None`` when absent, 401 ``invalid_seal`` if junk."""
    if value is None or not value.strip():
        return None
    try:
        auth = json.loads(value)
    except (ValueError, RecursionError):
        raise _unauthorized("invalid_seal", "seal header is not JSON") from None
    if not isinstance(auth, dict):
        raise _unauthorized("invalid_seal", "seal header is not an object")
    return auth


# ------------------------------------------------------------------ manifests


def _manifest_payload(manifest: Mapping[str, Any]) -> bytes:
    text = json.dumps(
        dict(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return _MANIFEST_DOMAIN + text.encode("ascii")


def sign_manifest(manifest: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """``manifest`` plus ``kid`` and ``signature`` (base64url Ed25519).

    The signature covers the canonical JSON (``sort_keys``, ``(",", ":")``)
    of the manifest with ``kid`` set and without ``signature``; an existing
    ``kid`` / ``signature`` is replaced, so re-signing with a new key works.
    Values must be JSON-serialisable (``TypeError`` / ``ValueError`` otherwise).
    """
    body = {k: v for k, v in manifest.items() if k not in ("signature", "kid")}
    body["kid"] = signer.key_id
    signature = signer.sign(_manifest_payload(body))
    return {**body, "signature": _b64e(signature)}


def verify_manifest(signed: Mapping[str, Any], keyring: Keyring) -> dict[str, Any]:
    """Check a :func:`sign_manifest` result; return the manifest without ``kid`` / ``signature``.

    Raises ``AuthError(401, code)``: ``unsigned`` (no ``signature`` / ``kid``),
    ``unknown_key`` or ``bad_signature`` (any field changed, or not canonical JSON).
    """
    sig_text, kid = signed.get("signature"), signed.get("kid")
    if sig_text is None or kid is None:
        raise _unauthorized("unsigned", "manifest is not signed")
    if not isinstance(kid, str) or kid not in keyring:
        raise _unauthorized("unknown_key", "manifest signed by an untrusted key")
    try:
        signature = _b64d(sig_text) if isinstance(sig_text, str) else b""
        payload = _manifest_payload({k: v for k, v in signed.items() if k != "signature"})
    except (ValueError, TypeError):
        raise _unauthorized("bad_signature", "malformed manifest signature") from None
    if len(signature) != _SIG_BYTES or not keyring.verify(kid, signature, payload):
        raise _unauthorized("bad_signature", "manifest signature does not match")
    return {k: v for k, v in signed.items() if k not in ("signature", "kid")}
