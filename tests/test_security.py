"""Security module tests: mostly the ways a credential or a signature must be refused.

Time is always passed in (``NOW`` and hand-advanced offsets), never read.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt as pyjwt
import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.runtime.security import (
    AuthError,
    JwtConfig,
    Keyring,
    Principal,
    ReplayCache,
    Signer,
    authenticate,
    constant_time_equal,
    decode_seal_header,
    encode_seal_header,
    generate_api_key,
    generate_keypair,
    hash_api_key,
    is_issued_credential,
    issued_credentials,
    key_id_of,
    open_sealed,
    require_scope,
    require_tenant,
    seal,
    sign_manifest,
    verify_jwt,
    verify_manifest,
)
from haif.runtime.store import open_store

NOW = 1_700_000_000.0
ISSUER = "https://auth.example.test"
AUDIENCE = "haif-gateway"
HS_SECRET = b"0123456789abcdef0123456789abcdef-haif"

# ----------------------------------------------------------------- key material


def _pem_public(key: Any) -> bytes:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()

PRIVATE_BY_ALG: dict[str, Any] = {
    "RS256": RSA_KEY,
    "ES256": EC_KEY,
    "EdDSA": ED_KEY,
    "HS256": HS_SECRET,
}
PUBLIC_BY_ALG: dict[str, str | bytes] = {
    "RS256": _pem_public(RSA_KEY),
    "ES256": _pem_public(EC_KEY).decode(),  # str keys work too
    "EdDSA": _pem_public(ED_KEY),
    "HS256": HS_SECRET,
}

CLUSTER_PRIVATE, CLUSTER_PUBLIC = generate_keypair()
OTHER_PRIVATE, OTHER_PUBLIC = generate_keypair()
STRANGER_PRIVATE, _ = generate_keypair()
SIGNER = Signer(CLUSTER_PRIVATE)
OTHER_SIGNER = Signer(OTHER_PRIVATE)
STRANGER = Signer(STRANGER_PRIVATE)
KEYRING = Keyring([CLUSTER_PUBLIC, OTHER_PUBLIC])


def config(alg: str = "RS256", **overrides: Any) -> JwtConfig:
    return JwtConfig(issuer=ISSUER, audience=AUDIENCE, key=PUBLIC_BY_ALG[alg], **overrides)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "tenant": "acme",
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
        "scope": "inference models:read",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(
    alg: str = "RS256", key: Any = None, headers: dict[str, Any] | None = None, **kw: Any
) -> str:
    return pyjwt.encode(
        claims(**kw), PRIVATE_BY_ALG[alg] if key is None else key, algorithm=alg, headers=headers
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(header: dict[str, Any], payload: dict[str, Any], signing_key: bytes | None) -> str:
    """A JWS built by hand (pyjwt refuses to make the forgeries we test)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b""
    if signing_key is not None:
        sig = hmac.new(signing_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def swap_payload(tok: str, **kw: Any) -> str:
    head, _, sig = tok.split(".")
    return f"{head}.{b64(json.dumps(claims(**kw)).encode())}.{sig}"


def auth_code(fn: Callable[[], object]) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn()
    return info.value


# ------------------------------------------------------------------------- JWT


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_valid_tokens_accepted(alg: str) -> None:
    principal = verify_jwt(token(alg), config(alg), NOW)
    assert principal == Principal(
        tenant="acme",
        subject="user-1",
        scopes=("inference", "models:read"),
        expires_at=NOW + 3600,
    )


def test_allowed_algorithms_follow_the_key_type() -> None:
    assert config("RS256").allowed_algorithms == {"RS256"}
    assert config("ES256").allowed_algorithms == {"ES256"}
    assert config("EdDSA").allowed_algorithms == {"EdDSA"}
    assert config("HS256").allowed_algorithms == {"HS256"}


def test_scp_list_and_custom_tenant_claim() -> None:
    tok = token(scope=None, scp=["a", "b", "a"], tenant=None, org="globex")
    principal = verify_jwt(tok, config(tenant_claim="org"), NOW)
    assert principal.tenant == "globex"
    assert principal.scopes == ("a", "b")


def test_leeway_tolerates_small_clock_differences() -> None:
    tok = token(exp=int(NOW) - 29, nbf=int(NOW) + 29, iat=int(NOW) + 29)
    assert verify_jwt(tok, config(), NOW).tenant == "acme"


def test_same_token_expires_as_the_clock_advances() -> None:
    tok = token(exp=int(NOW) + 60)
    cfg = config(leeway_s=0.0)
    assert verify_jwt(tok, cfg, NOW + 59.9).tenant == "acme"
    assert auth_code(lambda: verify_jwt(tok, cfg, NOW + 60)).code == "token_expired"


ALG_NONE_PAYLOAD = claims()
RSA_PUBLIC_PEM = _pem_public(RSA_KEY)

# (id, token factory, config factory, expected code)
NEGATIVE_JWT: list[tuple[str, Callable[[], str], Callable[[], JwtConfig], str]] = [
    (
        "alg none",
        lambda: hand_built({"alg": "none", "typ": "JWT"}, ALG_NONE_PAYLOAD, None),
        config,
        "alg_not_allowed",
    ),
    (
        "alg None",
        lambda: hand_built({"alg": "None"}, ALG_NONE_PAYLOAD, None),
        lambda: config("HS256"),
        "alg_not_allowed",
    ),
    (
        "alg missing",
        lambda: hand_built({"typ": "JWT"}, ALG_NONE_PAYLOAD, None),
        config,
        "alg_not_allowed",
    ),
    (
        "HS256 when only RS256 allowed (public key as HMAC secret)",
        lambda: hand_built({"alg": "HS256"}, ALG_NONE_PAYLOAD, RSA_PUBLIC_PEM),
        lambda: config(algorithms=("RS256",)),
        "alg_not_allowed",
    ),
    (
        "HS256 with the RSA public key, default algorithm list",
        lambda: hand_built({"alg": "HS256"}, ALG_NONE_PAYLOAD, RSA_PUBLIC_PEM),
        config,
        "alg_not_allowed",
    ),
    ("RS512 not in the list", lambda: token("RS512", key=RSA_KEY), config, "alg_not_allowed"),
    ("ES256 token, RSA key configured", lambda: token("ES256"), config, "alg_not_allowed"),
    ("wrong RSA key", lambda: token(key=RSA_OTHER), config, "invalid_token"),
    (
        "wrong HMAC secret",
        lambda: token("HS256", key=b"x" * 40),
        lambda: config("HS256"),
        "invalid_token",
    ),
    ("tampered payload", lambda: swap_payload(token(), tenant="evil"), config, "invalid_token"),
    (
        "tampered EdDSA payload",
        lambda: swap_payload(token("EdDSA"), sub="root"),
        lambda: config("EdDSA"),
        "invalid_token",
    ),
    ("expired", lambda: token(exp=int(NOW) - 31), config, "token_expired"),
    ("nbf in the future", lambda: token(nbf=int(NOW) + 31), config, "token_not_yet_valid"),
    ("iat in the future", lambda: token(iat=int(NOW) + 31), config, "token_not_yet_valid"),
    ("wrong aud", lambda: token(aud="someone-else"), config, "invalid_audience"),
    ("missing aud", lambda: token(aud=None), config, "invalid_audience"),
    ("wrong iss", lambda: token(iss="https://evil.test"), config, "invalid_issuer"),
    ("missing iss", lambda: token(iss=None), config, "invalid_issuer"),
    ("missing exp", lambda: token(exp=None), config, "invalid_token"),
    ("exp not a number", lambda: token(exp="tomorrow"), config, "invalid_token"),
    ("exp is a bool", lambda: token(exp=True), config, "invalid_token"),
    ("missing tenant", lambda: token(tenant=None), config, "invalid_tenant"),
    ("empty tenant", lambda: token(tenant=""), config, "invalid_tenant"),
    ("blank tenant", lambda: token(tenant="  "), config, "invalid_tenant"),
    ("tenant not a string", lambda: token(tenant=42), config, "invalid_tenant"),
    ("tenant with control chars", lambda: token(tenant="a\nb"), config, "invalid_tenant"),
    ("sub not a string", lambda: token(sub=7), config, "invalid_token"),
    ("scope not a string", lambda: token(scope={"a": 1}), config, "invalid_token"),
    ("crit header", lambda: token(headers={"crit": ["exp"], "exp": 1}), config, "invalid_token"),
    ("garbage", lambda: "a.b.c", config, "invalid_token"),
    ("header not an object", lambda: f"{b64(b'[1]')}.{b64(b'{}')}.", config, "invalid_token"),
    ("two parts", lambda: token().rsplit(".", 1)[0], config, "invalid_token"),
    ("too long", lambda: "a." + "b" * 20_000 + ".c", config, "invalid_token"),
]


@pytest.mark.parametrize(
    ("make_token", "make_config", "code"),
    [pytest.param(t, c, code, id=name) for name, t, c, code in NEGATIVE_JWT],
)
def test_bad_tokens_refused(
    make_token: Callable[[], str], make_config: Callable[[], JwtConfig], code: str
) -> None:
    err = auth_code(lambda: verify_jwt(make_token(), make_config(), NOW))
    assert (err.status, err.code) == (401, code)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"algorithms": ("none",)}, id="none configured"),
        pytest.param({"algorithms": ("HS256",)}, id="RSA key with HS256 only"),
        pytest.param({"key": b"short"}, id="HMAC secret too short"),
        pytest.param({"key": b""}, id="no key"),
        pytest.param(
            {
                "key": RSA_KEY.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            },
            id="private key",
        ),
        pytest.param(
            {"key": b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"}, id="junk PEM"
        ),
        pytest.param({"issuer": ""}, id="empty issuer"),
        pytest.param({"leeway_s": math.nan}, id="nan leeway"),
    ],
)
def test_bad_configs_rejected(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "key": RSA_PUBLIC_PEM}
    with pytest.raises(ValueError):
        JwtConfig(**{**base, **kwargs})


def test_config_repr_hides_the_key() -> None:
    assert "0123456789abcdef" not in repr(config("HS256"))


def test_nan_clock_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        verify_jwt(token(), config(), math.nan)


# -------------------------------------------------------------------- API keys


class FakeKeyStore:
    """``tenant_for_key`` semantics: hashes only, revoked keys look unknown."""

    def __init__(self) -> None:
        self.tenants: dict[str, str] = {}
        self.revoked: set[str] = set()
        self.lookups: list[str] = []

    async def lookup(self, key_hash: str) -> str | None:
        self.lookups.append(key_hash)
        return None if key_hash in self.revoked else self.tenants.get(key_hash)


@pytest.fixture
def keystore() -> tuple[FakeKeyStore, str]:
    store = FakeKeyStore()
    key = generate_api_key()
    store.tenants[hash_api_key(key)] = "acme"
    return store, key


def test_generate_and_hash_api_key() -> None:
    key = generate_api_key()
    assert key.startswith("haif-") and len(key) >= 5 + 32
    assert "." not in key
    assert generate_api_key("sk_live").startswith("sk_live-")
    assert len({generate_api_key() for _ in range(50)}) == 50
    digest = hash_api_key(key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert len(digest) == 64 and digest == hash_api_key(key)
    for bad in ("", "has space", "a.b", "x" * 33):
        with pytest.raises(ValueError):
            generate_api_key(bad)


def test_constant_time_equal() -> None:
    assert constant_time_equal("abc", "abc")
    assert constant_time_equal(b"abc", "abc")
    assert not constant_time_equal("abc", "abd")
    assert not constant_time_equal("abc", "ab")
    assert constant_time_equal("é", "é")  # non-ASCII does not raise
    # Headers that are not UTF-8 arrive with lone surrogates (surrogateescape).
    assert constant_time_equal("a\udcff", "a\udcff")
    assert not constant_time_equal("a\udcff", "a\udcfe")


def test_issued_credentials_tell_keys_and_jwts_from_placeholders() -> None:
    key = generate_api_key()
    jwt_text = pyjwt.encode({"a": 1}, HS_SECRET, algorithm="HS256")
    for issued in (key, generate_api_key("acme_prod"), jwt_text, "a.b.c", "a.b."):
        assert is_issued_credential(issued), issued
    placeholders = ("", "unused", "EMPTY", "sk-" + "a" * 48, "haif-short", key + "x", key[:-1])
    for placeholder in (*placeholders, "haif-" + "\udcff" * 43, "a.b", "x" * 600):
        assert not is_issued_credential(placeholder), placeholder

    assert issued_credentials(None, None) == (None, None)
    assert issued_credentials("Bearer unused", "EMPTY") == (None, None)
    assert issued_credentials("Basic dXNlcjpwYXNz", None) == (None, None)
    assert issued_credentials(f"Basic {key}", None) == (None, None)  # not for us
    assert issued_credentials(f"  bearer   {key} ", "unused") == (f"bearer   {key}", None)
    assert issued_credentials("Bearer unused", f" {key} ") == (None, key)
    assert issued_credentials(f"Bearer {jwt_text}", key) == (f"Bearer {jwt_text}", key)


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "code"),
    [
        ("Bearer {gone}", None, "invalid_api_key"),
        (None, "{gone}", "invalid_api_key"),
        ("Bearer {key}", "{gone}", "ambiguous_credentials"),
        ("Bearer a.b.c", None, "invalid_token"),
    ],
)
async def test_issued_but_invalid_credentials_still_fail(
    keystore: tuple[FakeKeyStore, str], authorization: str | None, x_api_key: str | None, code: str
) -> None:
    """What the gateway keeps of optional credentials is checked as strictly as ever."""
    store, key = keystore
    gone = generate_api_key()
    store.revoked.add(hash_api_key(gone))
    kept = issued_credentials(
        authorization and authorization.format(key=key, gone=gone),
        x_api_key and x_api_key.format(key=key, gone=gone),
    )
    assert kept != (None, None)
    with pytest.raises(AuthError) as info:
        await authenticate(*kept, lookup_key=store.lookup, jwt=None, now=NOW)
    assert (info.value.status, info.value.code) == (401, code)


@pytest.mark.parametrize(
    ("authorization", "x_api_key"),
    [
        ("Bearer {key}", None),
        ("bearer   {key}  ", None),
        (None, "{key}"),
        ("Bearer {key}", "{key}"),
    ],
)
async def test_api_key_header_forms(
    keystore: tuple[FakeKeyStore, str], authorization: str | None, x_api_key: str | None
) -> None:
    store, key = keystore
    principal = await authenticate(
        authorization and authorization.format(key=key),
        x_api_key and x_api_key.format(key=key),
        lookup_key=store.lookup,
        jwt=None,
        now=NOW,
    )
    assert principal.tenant == "acme"
    assert principal.subject == f"api-key:{hash_api_key(key)[:12]}"
    assert principal.expires_at is None
    assert principal.has_scope("anything")
    assert store.lookups == [hash_api_key(key)]  # only the hash reaches the store


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "code"),
    [
        (None, None, "missing_credentials"),
        ("", "", "missing_credentials"),
        ("  ", None, "missing_credentials"),
        ("Bearer", None, "missing_credentials"),
        ("Bearer   ", None, "missing_credentials"),
        ("Basic dXNlcjpwYXNz", None, "invalid_credentials"),
        ("{key}", None, "invalid_credentials"),
        ("Bearer haif-unknown-key", None, "invalid_api_key"),
        (None, "haif-unknown-key", "invalid_api_key"),
        ("Bearer with spaces inside", None, "invalid_api_key"),
        ("Bearer {key}", "haif-other", "ambiguous_credentials"),
        (None, "x" * 600, "invalid_api_key"),
    ],
)
async def test_api_key_refusals(
    keystore: tuple[FakeKeyStore, str], authorization: str | None, x_api_key: str | None, code: str
) -> None:
    store, key = keystore
    with pytest.raises(AuthError) as info:
        await authenticate(
            authorization and authorization.format(key=key),
            x_api_key,
            lookup_key=store.lookup,
            jwt=None,
            now=NOW,
        )
    assert (info.value.status, info.value.code) == (401, code)


async def test_revoked_key_refused(keystore: tuple[FakeKeyStore, str]) -> None:
    store, key = keystore
    assert (await authenticate(None, key, lookup_key=store.lookup, jwt=None, now=NOW)).tenant
    store.revoked.add(hash_api_key(key))
    with pytest.raises(AuthError) as info:
        await authenticate(None, key, lookup_key=store.lookup, jwt=None, now=NOW)
    assert info.value.code == "invalid_api_key"


async def test_bearer_jwt_goes_to_verify_jwt(keystore: tuple[FakeKeyStore, str]) -> None:
    store, _ = keystore
    principal = await authenticate(
        f"Bearer {token('EdDSA')}", None, lookup_key=store.lookup, jwt=config("EdDSA"), now=NOW
    )
    assert principal.tenant == "acme" and principal.subject == "user-1"
    for tok, cfg, code in [
        (token(), None, "invalid_token"),  # JWT auth not configured
        (hand_built({"alg": "none"}, ALG_NONE_PAYLOAD, None), config(), "alg_not_allowed"),
        (token(exp=int(NOW) - 100), config(), "token_expired"),
    ]:
        with pytest.raises(AuthError) as info:
            await authenticate(f"Bearer {tok}", None, lookup_key=store.lookup, jwt=cfg, now=NOW)
        assert info.value.code == code
    assert store.lookups == []  # JWTs are never looked up as API keys


async def test_api_keys_against_the_duckdb_store(tmp_path: Path) -> None:
    store = await open_store(f"duckdb://{tmp_path / 'keys.duckdb'}")
    async with store:
        key = generate_api_key()
        assert await store.add_api_key(hash_api_key(key), "acme", "ci", now=NOW)
        principal = await authenticate(
            f"Bearer {key}", None, lookup_key=store.tenant_for_key, jwt=None, now=NOW
        )
        assert principal.tenant == "acme"
        assert await store.revoke_api_key(hash_api_key(key))
        with pytest.raises(AuthError, match="invalid_api_key"):
            await authenticate(None, key, lookup_key=store.tenant_for_key, jwt=None, now=NOW)


def test_scopes_and_tenants() -> None:
    user = Principal("acme", "u", ("inference",), NOW + 60)
    require_scope(user, "inference")
    err = auth_code(lambda: require_scope(user, "inference", "admin"))
    assert (err.status, err.code) == (403, "missing_scope")
    assert "admin" in err.message
    require_scope(Principal("acme", "api-key:x", ("*",), None), "admin")
    require_tenant(user, "acme")
    err = auth_code(lambda: require_tenant(user, "globex"))
    assert (err.status, err.code) == (403, "tenant_mismatch")
    assert err.to_error_body()["error"]["type"] == "permission_error"


def test_error_body_is_openai_shaped() -> None:
    body = AuthError(401, "invalid_api_key", "unknown or revoked API key").to_error_body()
    assert body == {
        "error": {
            "message": "unknown or revoked API key",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


# --------------------------------------------------------------------- keyring


def test_key_ids_and_signer() -> None:
    raw = serialization.load_pem_public_key(CLUSTER_PUBLIC).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert SIGNER.key_id == hashlib.sha256(raw).hexdigest()[:16] == key_id_of(CLUSTER_PUBLIC)
    assert SIGNER.public_pem == CLUSTER_PUBLIC
    assert KEYRING.key_ids == tuple(sorted([SIGNER.key_id, OTHER_SIGNER.key_id]))
    assert STRANGER.key_id not in KEYRING and len(KEYRING) == 2
    assert b"PRIVATE" not in repr(SIGNER).encode() and SIGNER.key_id in repr(SIGNER)
    sig = SIGNER.sign(b"payload")
    assert KEYRING.verify(SIGNER.key_id, sig, b"payload")
    assert not KEYRING.verify(SIGNER.key_id, sig, b"payloaD")
    assert not KEYRING.verify(OTHER_SIGNER.key_id, sig, b"payload")
    assert not KEYRING.verify("0" * 16, sig, b"payload")


def test_keyring_from_dir(tmp_path: Path) -> None:
    (tmp_path / "a.pub").write_bytes(CLUSTER_PUBLIC)
    (tmp_path / "b.pub").write_bytes(OTHER_PUBLIC)
    (tmp_path / "c.key").write_bytes(STRANGER_PRIVATE)  # not *.pub: ignored
    ring = Keyring.from_dir(tmp_path)
    assert set(ring.key_ids) == {SIGNER.key_id, OTHER_SIGNER.key_id}
    assert ring.add(CLUSTER_PUBLIC) == SIGNER.key_id and len(ring) == 2
    assert ring.remove(OTHER_SIGNER.key_id) and not ring.remove(OTHER_SIGNER.key_id)
    (tmp_path / "rsa.pub").write_bytes(RSA_PUBLIC_PEM)
    with pytest.raises(ValueError, match=r"rsa\.pub"):
        Keyring.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        Keyring.from_dir(tmp_path / "missing")


def test_non_ed25519_keys_rejected() -> None:
    with pytest.raises(ValueError):
        Keyring().add(RSA_PUBLIC_PEM)
    with pytest.raises(ValueError):
        Keyring().add(b"not a pem")
    with pytest.raises(ValueError):
        Signer(
            EC_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with pytest.raises(ValueError):
        Signer(CLUSTER_PUBLIC)


# ------------------------------------------------------------------- envelopes

BODY = msgpack.packb({"v": 1, "type": "infer", "id": "m1", "body": {"x": 1}}, use_bin_type=True)


def test_seal_round_trip() -> None:
    auth = seal(BODY, SIGNER, NOW)
    assert set(auth) == {"kid", "iat", "exp", "nonce", "sig"}
    assert auth["exp"] == NOW + 30.0 and auth["iat"] == NOW
    replay = ReplayCache(100)
    assert open_sealed(BODY, auth, KEYRING, NOW + 1, replay) == SIGNER.key_id
    # through msgpack and through an HTTP header the seal still opens
    over_msgpack = msgpack.unpackb(msgpack.packb(auth, use_bin_type=True), raw=False)
    assert open_sealed(BODY, over_msgpack, KEYRING, NOW + 1) == SIGNER.key_id
    header = encode_seal_header(auth)
    assert header.isascii()
    assert open_sealed(BODY, decode_seal_header(header), KEYRING, NOW + 1) == SIGNER.key_id
    assert decode_seal_header(None) is None and decode_seal_header(" ") is None
    for junk in ("{", "[1]"):
        assert auth_code(lambda j=junk: decode_seal_header(j)).code == "invalid_seal"  # type: ignore[misc]


def test_nonces_are_fresh() -> None:
    assert len({seal(BODY, SIGNER, NOW)["nonce"] for _ in range(50)}) == 50
    with pytest.raises(ValueError):
        seal(BODY, SIGNER, NOW, nonce="has space")
    with pytest.raises(ValueError):
        seal(BODY, SIGNER, NOW, ttl_s=0)


def _tamper(field: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda auth: {**auth, field: value}


def _drop(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda auth: {k: v for k, v in auth.items() if k != field}


def _flip_sig(auth: dict[str, Any]) -> dict[str, Any]:
    sig = bytearray(base64.urlsafe_b64decode(auth["sig"] + "=="))
    sig[0] ^= 1
    return {**auth, "sig": b64(bytes(sig))}


# (id, body, auth transform, expected code); sealed at NOW, opened at NOW + 1
NEGATIVE_SEALS: list[tuple[str, bytes, Callable[[dict[str, Any]], Any], str]] = [
    ("no auth", BODY, lambda a: None, "unsigned"),
    ("empty auth", BODY, lambda a: {}, "unsigned"),
    ("no sig", BODY, _drop("sig"), "unsigned"),
    ("no nonce", BODY, _drop("nonce"), "unsigned"),
    ("tampered body", BODY + b"\x00", lambda a: a, "bad_signature"),
    ("other body", b"{}", lambda a: a, "bad_signature"),
    ("tampered iat", BODY, _tamper("iat", NOW - 1), "bad_signature"),
    ("tampered exp", BODY, _tamper("exp", NOW + 31), "bad_signature"),
    ("tampered nonce", BODY, _tamper("nonce", "another-nonce"), "bad_signature"),
    (
        "kid of another trusted key",
        BODY,
        lambda a: {**a, "kid": OTHER_SIGNER.key_id},
        "bad_signature",
    ),
    ("audience added", BODY, _tamper("aud", "worker-1"), "bad_signature"),
    ("flipped signature bit", BODY, _flip_sig, "bad_signature"),
    ("signature not base64url", BODY, _tamper("sig", "!" * 86), "bad_signature"),
    ("signature padded", BODY, lambda a: {**a, "sig": a["sig"] + "=="}, "bad_signature"),
    ("signature truncated", BODY, lambda a: {**a, "sig": a["sig"][:-4]}, "bad_signature"),
    ("signature not a string", BODY, _tamper("sig", 123), "bad_signature"),
    ("unknown kid", BODY, _tamper("kid", "0123456789abcdef"), "unknown_key"),
    ("kid not a string", BODY, _tamper("kid", 1), "invalid_seal"),
    ("iat is NaN", BODY, _tamper("iat", math.nan), "invalid_seal"),
    ("iat is a bool", BODY, _tamper("iat", True), "invalid_seal"),
    ("exp is a string", BODY, _tamper("exp", "later"), "invalid_seal"),
    ("exp before iat", BODY, _tamper("exp", NOW - 1), "invalid_seal"),
    ("validity window too long", BODY, _tamper("exp", NOW + 10_000), "invalid_seal"),
    ("nonce with odd chars", BODY, _tamper("nonce", "a\x00b"), "invalid_seal"),
]


@pytest.mark.parametrize(
    ("body", "transform", "code"),
    [pytest.param(b, t, c, id=name) for name, b, t, c in NEGATIVE_SEALS],
)
def test_bad_seals_refused(
    body: bytes, transform: Callable[[dict[str, Any]], Any], code: str
) -> None:
    auth = transform(seal(BODY, SIGNER, NOW))
    err = auth_code(lambda: open_sealed(body, auth, KEYRING, NOW + 1, ReplayCache(10)))
    assert (err.status, err.code) == (401, code)


def test_unknown_signer_refused() -> None:
    err = auth_code(lambda: open_sealed(BODY, seal(BODY, STRANGER, NOW), KEYRING, NOW))
    assert err.code == "unknown_key"


@pytest.mark.parametrize(
    ("opened_at", "ok"),
    [
        (NOW - 5.0, True),  # sender clock 5 s ahead: tolerated
        (NOW - 5.001, False),
        (NOW + 30 + 4.999, True),  # expired by less than the skew
        (NOW + 35.0, False),
        (NOW + 3600, False),
    ],
)
def test_expiry_and_clock_skew(opened_at: float, ok: bool) -> None:
    auth = seal(BODY, SIGNER, NOW, ttl_s=30.0)
    if ok:
        assert open_sealed(BODY, auth, KEYRING, opened_at) == SIGNER.key_id
    else:
        assert auth_code(lambda: open_sealed(BODY, auth, KEYRING, opened_at)).code == "expired"


def test_skew_is_configurable() -> None:
    auth = seal(BODY, SIGNER, NOW, ttl_s=10.0)
    assert open_sealed(BODY, auth, KEYRING, NOW + 10.5, skew_s=1.0)
    assert (
        auth_code(lambda: open_sealed(BODY, auth, KEYRING, NOW + 10.5, skew_s=0.0)).code
        == "expired"
    )


def test_replay_refused_within_validity() -> None:
    replay = ReplayCache(100)
    auth = seal(BODY, SIGNER, NOW, nonce="n-1")
    assert open_sealed(BODY, auth, KEYRING, NOW, replay)
    assert auth_code(lambda: open_sealed(BODY, auth, KEYRING, NOW + 20, replay)).code == "replayed"
    # the same nonce from another key is a different message
    assert open_sealed(BODY, seal(BODY, OTHER_SIGNER, NOW, nonce="n-1"), KEYRING, NOW, replay)
    # after its validity the message is refused as expired, and the cache can forget it
    assert auth_code(lambda: open_sealed(BODY, auth, KEYRING, NOW + 36, replay)).code == "expired"
    assert replay.prune(NOW + 36) == 2 and len(replay) == 0


def test_forgeries_do_not_fill_the_replay_cache() -> None:
    replay = ReplayCache(100)
    auth = seal(BODY, SIGNER, NOW, nonce="n-2")
    auth_code(lambda: open_sealed(BODY + b"!", auth, KEYRING, NOW, replay))
    assert len(replay) == 0
    assert open_sealed(BODY, auth, KEYRING, NOW, replay)


def test_audience_binding() -> None:
    auth = seal(BODY, SIGNER, NOW, audience="worker-a")
    assert auth["aud"] == "worker-a"
    assert open_sealed(BODY, auth, KEYRING, NOW, audience="worker-a")
    for expected in ("worker-b", ""):
        err = auth_code(lambda e=expected: open_sealed(BODY, auth, KEYRING, NOW, audience=e))  # type: ignore[misc]
        assert err.code == "wrong_audience"
    plain = seal(BODY, SIGNER, NOW)
    assert (
        auth_code(lambda: open_sealed(BODY, plain, KEYRING, NOW, audience="worker-a")).code
        == "wrong_audience"
    )


def test_replay_cache_is_bounded_and_pure() -> None:
    cache = ReplayCache(2)
    assert cache.check_and_add("k", "a", expires_at=10.0, now=0.0)
    assert not cache.check_and_add("k", "a", expires_at=10.0, now=1.0)
    assert cache.check_and_add("k", "b", expires_at=20.0, now=1.0)
    err = auth_code(lambda: cache.check_and_add("k", "c", expires_at=20.0, now=2.0))
    assert (err.status, err.code) == (503, "replay_cache_full")
    assert ("k", "a") in cache
    assert cache.prune(10.0) == 1 and ("k", "a") not in cache
    assert cache.check_and_add("k", "c", expires_at=20.0, now=10.0)
    assert cache.prune(100.0) == 2 and len(cache) == 0
    with pytest.raises(ValueError):
        ReplayCache(0)


def test_nan_clock_refused_when_opening() -> None:
    with pytest.raises(ValueError):
        open_sealed(BODY, seal(BODY, SIGNER, NOW), KEYRING, math.nan)


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(min_size=1, max_size=300),
    data=st.data(),
    target=st.sampled_from(["body", "sig"]),
)
def test_random_byte_flips_always_refused(body: bytes, data: st.DataObject, target: str) -> None:
    auth = seal(body, SIGNER, NOW)
    sig = base64.urlsafe_b64decode(auth["sig"] + "==")
    original = body if target == "body" else sig
    index = data.draw(st.integers(0, len(original) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    flipped = bytearray(original)
    flipped[index] ^= mask
    if target == "body":
        body, tampered = bytes(flipped), auth
    else:
        tampered = {**auth, "sig": b64(bytes(flipped))}
    err = auth_code(lambda: open_sealed(body, tampered, KEYRING, NOW))
    assert err.code == "bad_signature"


# ------------------------------------------------------------------- manifests

MANIFEST: dict[str, Any] = {
    "model": "tiny-llm",
    "version": "1.0.0",
    "files": {"model.safetensors": "ab" * 32, "config.json": "cd" * 32},
    "size_bytes": 123456,
}


def test_manifest_round_trip() -> None:
    signed = sign_manifest(MANIFEST, SIGNER)
    assert signed["kid"] == SIGNER.key_id and isinstance(signed["signature"], str)
    assert verify_manifest(signed, KEYRING) == MANIFEST
    # survives a trip through a JSON file with different key order and spacing
    reloaded = json.loads(json.dumps(dict(reversed(list(signed.items()))), indent=2))
    assert verify_manifest(reloaded, KEYRING) == MANIFEST
    # re-signing with another key replaces kid and signature
    resigned = sign_manifest(signed, OTHER_SIGNER)
    assert resigned["kid"] == OTHER_SIGNER.key_id
    assert verify_manifest(resigned, KEYRING) == MANIFEST


def _with(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda signed: {**signed, **changes}


NEGATIVE_MANIFESTS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    ("tampered value", _with(version="1.0.1"), "bad_signature"),
    (
        "tampered digest",
        _with(files={**MANIFEST["files"], "config.json": "00" * 32}),
        "bad_signature",
    ),
    ("field added", _with(extra=True), "bad_signature"),
    ("field removed", lambda s: {k: v for k, v in s.items() if k != "size_bytes"}, "bad_signature"),
    ("kid of another trusted key", lambda s: {**s, "kid": OTHER_SIGNER.key_id}, "bad_signature"),
    ("garbage signature", _with(signature="AAAA"), "bad_signature"),
    ("signature not a string", _with(signature=5), "bad_signature"),
    ("unknown kid", _with(kid="0123456789abcdef"), "unknown_key"),
    ("no signature", lambda s: {k: v for k, v in s.items() if k != "signature"}, "unsigned"),
    ("no kid", lambda s: {k: v for k, v in s.items() if k != "kid"}, "unsigned"),
    ("never signed", lambda s: dict(MANIFEST), "unsigned"),
]


@pytest.mark.parametrize(
    ("transform", "code"),
    [pytest.param(t, c, id=name) for name, t, c in NEGATIVE_MANIFESTS],
)
def test_bad_manifests_refused(
    transform: Callable[[dict[str, Any]], dict[str, Any]], code: str
) -> None:
    signed = transform(sign_manifest(MANIFEST, SIGNER))
    err = auth_code(lambda: verify_manifest(signed, KEYRING))
    assert (err.status, err.code) == (401, code)


def test_manifest_from_untrusted_signer_refused() -> None:
    err = auth_code(lambda: verify_manifest(sign_manifest(MANIFEST, STRANGER), KEYRING))
    assert err.code == "unknown_key"


def test_manifest_must_be_json() -> None:
    with pytest.raises(TypeError):
        sign_manifest({"blob": b"bytes"}, SIGNER)
    with pytest.raises(ValueError):
        sign_manifest({"x": math.inf}, SIGNER)


def test_principal_is_frozen() -> None:
    principal = Principal("acme", "u", (), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        principal.tenant = "evil"  # type: ignore[misc]
