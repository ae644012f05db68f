"""Authentication at the gateway, end to end, with ``auth.required: true``.

API keys are created with the real ``haif keys`` CLI against the store file
while the cluster is down, then served by a live orchestrator (the gateway
looks them up through its ``auth_key`` RPC); JWTs are verified with the
cluster YAML's ``auth.jwt`` (an Ed25519 public key file). Rate-limit
headers come from a tenant quota in the same YAML's ``policy``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from harness.api import MODEL, expected_text
from harness.cluster import LiveCluster, run_haif, running

from haif.runtime.cluster import gateway_auth, load_cluster
from haif.runtime.security import hash_api_key
from haif.runtime.services import add_key

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.cluster]

ISSUER = "https://issuer.test"
KEY_CACHE_S = 1.0
AUDIENCE = "haif-test"
CLUSTER_YAML = f"""
auth:
  required: true
  key_cache_s: {KEY_CACHE_S}
  jwt:
    issuer: {ISSUER}
    audience: {AUDIENCE}
    key_file: jwt.pub
    algorithms: [EdDSA]
policy:
  tenant_quotas:
    limited: {{requests_per_min: 2, burst_s: 30}}
"""


def haif_cli(*args: str) -> str:
    done = run_haif(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class AuthCluster:
    live: LiveCluster
    keys: dict[str, str]  # tenant -> API key
    revoked_key: str
    store_bytes: bytes  # the store file as the CLI left it
    signing_key: ed25519.Ed25519PrivateKey

    @property
    def url(self) -> str:
        return self.live.url

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "user-1",
            "tenant": "jwt-tenant",
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return pyjwt.encode(claims, self.signing_key, algorithm="EdDSA")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthCluster]:
    tmp = tmp_path_factory.mktemp("auth")
    signing_key = ed25519.Ed25519PrivateKey.generate()
    (tmp / "jwt.pub").write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp / "cluster.yaml").write_text(CLUSTER_YAML)
    config = load_cluster(tmp / "cluster.yaml")
    store = tmp / "store.duckdb"

    # The cluster is down: keys go straight into its store file.
    acme = haif_cli("keys", "add", "--tenant", "acme", "--name", "ci", "--store", str(store))
    keys = {"acme": acme.strip()}
    for tenant in ("globex", "limited", "gone"):
        keys[tenant] = await asyncio.to_thread(add_key, str(store), tenant, "test")
    haif_cli("keys", "revoke", keys["gone"], "--store", str(store))
    store_bytes = store.read_bytes()

    live = LiveCluster(
        tmp,
        workers=("w1",),
        mean_s=0.05,
        policy=config.policy,
        auth=gateway_auth(config.auth, tmp),
        store_path=store,
    )
    async with running(live):
        yield AuthCluster(live, keys, keys.pop("gone"), store_bytes, signing_key)


async def complete(
    session: aiohttp.ClientSession,
    cluster: AuthCluster,
    headers: dict[str, str],
    request_id: str | None = None,
    **extra: Any,
) -> tuple[int, dict[str, str], Any]:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, **extra}
    if request_id is not None:
        headers = {**headers, "x-request-id": request_id}
    async with session.post(f"{cluster.url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def assert_auth_error(status: int, headers: dict[str, str], body: Any, code: str) -> None:
    assert status == 401, body
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == code, body


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def test_keys_cli_stores_only_the_hash(cluster: AuthCluster) -> None:
    key = cluster.keys["acme"]
    assert key.startswith("haif-") and len(key) > 40
    assert key.encode() not in cluster.store_bytes
    assert cluster.live.orch is not None
    store = cluster.live.orch.store
    assert await store.tenant_for_key(hash_api_key(key)) == "acme"
    assert await store.tenant_for_key(hash_api_key(cluster.revoked_key)) is None


async def test_no_credentials(cluster: AuthCluster, session: aiohttp.ClientSession) -> None:
    assert_auth_error(*await complete(session, cluster, {}), "missing_credentials")
    # Streaming requests too, and before any event is sent.
    assert_auth_error(*await complete(session, cluster, {}, stream=True), "missing_credentials")
    async with session.get(f"{cluster.url}/v1/models") as resp:
        assert resp.status == 401


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        (bearer("haif-" + "A" * 43), "invalid_api_key"),
        ({"x-api-key": "sk-not-a-key"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_credentials"),
    ],
    ids=["unknown-bearer", "unknown-x-api-key", "not-bearer"],
)
async def test_unknown_credentials(
    cluster: AuthCluster, session: aiohttp.ClientSession, headers: dict[str, str], code: str
) -> None:
    assert_auth_error(*await complete(session, cluster, headers), code)


async def test_revoked_key(cluster: AuthCluster, session: aiohttp.ClientSession) -> None:
    result = await complete(session, cluster, bearer(cluster.revoked_key))
    assert_auth_error(*result, "invalid_api_key")


@pytest.mark.parametrize("form", ["bearer", "x-api-key"])
async def test_valid_key_acts_for_its_tenant(
    cluster: AuthCluster, session: aiohttp.ClientSession, form: str
) -> None:
    key = cluster.keys["acme"]
    headers = bearer(key) if form == "bearer" else {"x-api-key": key}
    # A tenant header of its own choosing is not honoured.
    headers["x-haif-tenant"] = "globex"
    rid = f"auth-key-{form}"
    status, _, body = await complete(session, cluster, headers, rid)
    assert status == 200, body
    assert body["choices"][0]["text"] == expected_text(rid, 3)
    record = await cluster.live.record(rid)
    assert record.tenant == "acme" and record.status == "ok"


async def test_key_revoked_while_running_stops_within_the_cache_time(
    cluster: AuthCluster, session: aiohttp.ClientSession
) -> None:
    """Checked against the cache entry's own expiry (the gateway's monotonic
    clock), not against a sleep: before it a revoked key may still pass,
    after it the key is refused."""
    key = cluster.keys["globex"]
    gateway = cluster.live.gateway
    assert gateway is not None and cluster.live.orch is not None
    sent = time.monotonic()
    status, _, body = await complete(session, cluster, bearer(key), "auth-globex")
    answered = time.monotonic()
    assert status == 200, body
    assert (await cluster.live.record("auth-globex")).tenant == "globex"
    tenant, expires = gateway._key_cache[hash_api_key(key)]
    assert tenant == "globex"
    assert sent + KEY_CACHE_S <= expires <= answered + KEY_CACHE_S  # cached for key_cache_s
    assert await cluster.live.orch.store.revoke_api_key(hash_api_key(key))
    # Still cached: a request answered before the expiry is served (when the
    # machine is so slow that none is, there is nothing to check here).
    cached = await complete(session, cluster, bearer(key))
    if time.monotonic() < expires:
        assert cached[0] == 200, cached
    # Sent after the expiry: refused.
    await asyncio.sleep(max(0.0, expires - time.monotonic()))
    while time.monotonic() <= expires:
        await asyncio.sleep(0.001)
    assert_auth_error(*await complete(session, cluster, bearer(key)), "invalid_api_key")


async def test_valid_jwt(cluster: AuthCluster, session: aiohttp.ClientSession) -> None:
    status, _, body = await complete(session, cluster, bearer(cluster.token()), "auth-jwt")
    assert status == 200, body
    assert (await cluster.live.record("auth-jwt")).tenant == "jwt-tenant"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _unsigned(cluster: AuthCluster) -> str:
    good = cluster.token()
    claims = pyjwt.decode(good, options={"verify_signature": False})
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda c: c.token(exp=int(time.time()) - 120), "token_expired"),
        (lambda c: c.token(aud="someone-else"), "invalid_audience"),
        (lambda c: c.token(iss="https://evil.test"), "invalid_issuer"),
        (_unsigned, "alg_not_allowed"),
        (
            lambda c: pyjwt.encode(
                {"iss": ISSUER, "aud": AUDIENCE, "tenant": "x", "exp": time.time() + 60},
                ed25519.Ed25519PrivateKey.generate(),
                algorithm="EdDSA",
            ),
            "invalid_token",
        ),
        (
            lambda c: pyjwt.encode(
                {"iss": ISSUER, "aud": AUDIENCE, "tenant": "x", "exp": time.time() + 60},
                "a-shared-secret-that-is-long-enough-for-hs256",
                algorithm="HS256",
            ),
            "alg_not_allowed",
        ),
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "alg-none", "foreign-key", "hs256"],
)
async def test_bad_jwts(
    cluster: AuthCluster, session: aiohttp.ClientSession, make: Any, code: str
) -> None:
    assert_auth_error(*await complete(session, cluster, bearer(make(cluster))), code)


async def test_rate_limited_tenant_gets_retry_after(
    cluster: AuthCluster, session: aiohttp.ClientSession
) -> None:
    headers = bearer(cluster.keys["limited"])
    status, _, body = await complete(session, cluster, headers)
    assert status == 200, body
    status, got, body = await complete(session, cluster, headers)
    assert status == 429, body
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert body["error"]["code"] == "tenant_requests_per_min"
    assert 1 <= int(got["Retry-After"]) <= 30
    # the limit is what may be sent before exhausting it: 2/min x 30 s burst = 1
    assert got["x-ratelimit-limit-requests"] == "1"
    assert got["x-ratelimit-remaining-requests"] == "0"
    assert got["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in got  # no token budget for this tenant
    # Another tenant is not affected.
    status, _, body = await complete(session, cluster, bearer(cluster.keys["acme"]))
    assert status == 200, body


# Tenant isolation of Idempotency-Key replay and of request ids is tested in
# tests/test_runtime_reliability.py::test_keys_and_request_ids_are_per_tenant.
