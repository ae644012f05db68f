"""The artifact store, its verification, the warm-model cache and ``haif artifacts``.

No torch needed: the artifacts here are small dummy files. A worker whose
engine needs an artifact is started against a real RPC heartbeat receiver on
loopback: with a tampered artifact it fails to start and never heartbeats.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from haif.contracts import Request
from haif.runtime.artifacts import (
    ArtifactError,
    ArtifactRef,
    ModelCache,
    ModelCacheFull,
    blob_path,
    fetch,
    list_artifacts,
    load_manifest,
    manifest_path,
    publish,
    verify,
)
from haif.runtime.artifacts_cli import (
    add_artifact_commands,
    load_or_create_key,
    public_key_path,
)
from haif.runtime.engines import SyntheticEngine
from haif.runtime.messages import Announce
from haif.runtime.rpc import add_rpc_routes
from haif.runtime.security import Keyring, Signer, generate_keypair
from haif.runtime.worker import Worker, WorkerSpec, build_app

FILES = {
    "config.json": b'{"model_type": "dummy", "n_layer": 2}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer/vocab.json": b'{"a": 0, "b": 1}',
}


def make_signer() -> Signer:
    private_pem, _public = generate_keypair()
    return Signer(private_pem)


@pytest.fixture
def signer() -> Signer:
    return make_signer()


@pytest.fixture
def keyring(signer: Signer) -> Keyring:
    return Keyring([signer.public_pem])


@pytest.fixture
def source(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, data in FILES.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[name] = path
    return out


@pytest.fixture
def store(tmp_path: Path, source: dict[str, Path], signer: Signer) -> Path:
    root = tmp_path / "store"
    publish(
        root, "dummy", "1", source, signer, engine="transformers", created="2025-01-01T00:00:00Z"
    )
    return root


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refused(code: str, root: Path, keyring: Keyring, version: str = "1") -> ArtifactError:
    with pytest.raises(ArtifactError) as verify_info:
        verify(root, "dummy", version, keyring)
    assert verify_info.value.code == code, verify_info.value
    with pytest.raises(ArtifactError) as fetch_info:
        fetch(root, "dummy", version, keyring, root.parent / "fetched")
    assert fetch_info.value.code == code
    return verify_info.value


# ------------------------------------------------------------------- publish


def test_publish_stores_blobs_by_digest_and_a_signed_manifest(
    store: Path, signer: Signer, keyring: Keyring
) -> None:
    path = manifest_path(store, "dummy", "1")
    assert path == store / "manifests" / "dummy" / "1.json"
    signed = json.loads(path.read_text())
    assert signed["kid"] == signer.key_id and signed["signature"]
    assert signed["name"] == "dummy" and signed["version"] == "1"
    assert signed["engine"] == "transformers" and signed["created"] == "2025-01-01T00:00:00Z"
    assert signed["files"] == {
        name: {"sha256": digest(data), "size": len(data)} for name, data in FILES.items()
    }
    for data in FILES.values():
        assert blob_path(store, digest(data)).read_bytes() == data
    blobs = [p for p in (store / "blobs" / "sha256").iterdir() if p.is_file()]
    assert len(blobs) == len(FILES)  # nothing else left behind (no temporary files)

    manifest = load_manifest(store, "dummy", "1", keyring)
    assert "signature" not in manifest and manifest["files"] == signed["files"]


def test_verify_and_fetch_return_the_verified_files(
    store: Path, keyring: Keyring, tmp_path: Path
) -> None:
    paths = verify(store, "dummy", "1", keyring)
    assert {n: p.read_bytes() for n, p in paths.items()} == FILES
    assert all(p.parent == store / "blobs" / "sha256" for p in paths.values())

    dest = tmp_path / "model"
    copied = fetch(store, "dummy", "1", keyring, dest)
    assert copied == {name: dest / name for name in FILES}
    assert {n: p.read_bytes() for n, p in copied.items()} == FILES


def test_identical_content_is_stored_once_and_versions_are_immutable(
    store: Path, source: dict[str, Path], signer: Signer, keyring: Keyring
) -> None:
    publish(store, "dummy", "2", {"copy.bin": source["model.safetensors"]}, signer)
    blobs = [p for p in (store / "blobs" / "sha256").iterdir() if p.is_file()]
    assert len(blobs) == len(FILES)
    assert (
        verify(store, "dummy", "2", keyring)["copy.bin"].read_bytes() == FILES["model.safetensors"]
    )
    with pytest.raises(ArtifactError) as info:
        publish(store, "dummy", "1", source, signer)
    assert info.value.code == "exists"
    publish(store, "dummy", "1", source, signer, overwrite=True)
    assert verify(store, "dummy", "1", keyring)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 200, "a..b"])
def test_bad_names_are_refused(store: Path, keyring: Keyring, name: str) -> None:
    with pytest.raises(ArtifactError) as info:
        verify(store, name, "1", keyring)
    assert info.value.code == "bad_name"
    with pytest.raises(ArtifactError):
        ArtifactRef.parse(f"{name}:1")


@pytest.mark.parametrize("file_name", ["../x", "/abs", "a/../b", "a//b", "", "a\\b"])
def test_unsafe_file_names_are_refused_at_publish(
    tmp_path: Path, source: dict[str, Path], signer: Signer, file_name: str
) -> None:
    with pytest.raises(ArtifactError) as info:
        publish(tmp_path / "s", "m", "1", {file_name: source["config.json"]}, signer)
    assert info.value.code == "bad_file"


def test_model_refs() -> None:
    assert ArtifactRef.parse("tiny-gpt2:1") == ArtifactRef("tiny-gpt2", "1")
    assert str(ArtifactRef("tiny-gpt2", "1.0")) == "tiny-gpt2:1.0"
    with pytest.raises(ArtifactError, match="NAME:VERSION"):
        ArtifactRef.parse("tiny-gpt2")


# -------------------------------------------------------------- refusals


def test_a_tampered_blob_byte_is_refused(store: Path, keyring: Keyring, tmp_path: Path) -> None:
    blob = blob_path(store, digest(FILES["model.safetensors"]))
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0x01
    blob.write_bytes(bytes(data))
    error = refused("digest_mismatch", store, keyring)
    assert "model.safetensors" in error.message and "tampered" in error.message
    # fetch left nothing under the file names it was writing
    fetched = tmp_path / "fetched"
    assert not [p for p in fetched.rglob("*") if p.is_file()]


def test_a_truncated_blob_is_refused(store: Path, keyring: Keyring) -> None:
    blob = blob_path(store, digest(FILES["config.json"]))
    blob.write_bytes(blob.read_bytes()[:-1])
    refused("digest_mismatch", store, keyring)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["files"]["model.safetensors"].update(size=1),
        lambda m: m["files"]["config.json"].update(sha256="0" * 64),
        lambda m: m.update(engine="vllm"),
        lambda m: m["files"].pop("tokenizer/vocab.json"),
        lambda m: m.update(extra="field"),
        lambda m: m.pop("signature"),
    ],
)
def test_a_tampered_manifest_is_refused(store: Path, keyring: Keyring, edit: Any) -> None:
    path = manifest_path(store, "dummy", "1")
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    error = refused("bad_signature", store, keyring)
    assert "dummy:1" in error.message


def test_a_manifest_that_is_not_json_is_refused(store: Path, keyring: Keyring) -> None:
    manifest_path(store, "dummy", "1").write_text("{not json")
    refused("bad_manifest", store, keyring)


def test_a_manifest_moved_to_another_version_is_refused(store: Path, keyring: Keyring) -> None:
    v1 = manifest_path(store, "dummy", "1")
    v2 = manifest_path(store, "dummy", "2")
    v2.write_bytes(v1.read_bytes())  # validly signed, but for version 1
    error = refused("bad_manifest", store, keyring, version="2")
    assert "dummy:1" in error.message


def test_an_unknown_signer_is_refused(store: Path, signer: Signer) -> None:
    other = make_signer()
    error = refused("untrusted_signer", store, Keyring([other.public_pem]))
    assert signer.key_id in error.message and other.key_id in error.message
    refused("untrusted_signer", store, Keyring())


def test_a_manifest_signed_by_an_untrusted_key_is_refused(
    tmp_path: Path, source: dict[str, Path], keyring: Keyring
) -> None:
    mallory = make_signer()
    root = tmp_path / "store"
    publish(root, "dummy", "1", source, mallory)
    refused("untrusted_signer", root, keyring)


def test_a_missing_blob_is_refused(store: Path, keyring: Keyring) -> None:
    blob_path(store, digest(FILES["tokenizer/vocab.json"])).unlink()
    error = refused("missing_blob", store, keyring)
    assert "tokenizer/vocab.json" in error.message


def test_an_unknown_artifact_is_not_found(store: Path, keyring: Keyring) -> None:
    refused("not_found", store, keyring, version="9")


def test_list_shows_manifests_without_verifying(store: Path) -> None:
    manifest_path(store, "broken", "1").parent.mkdir(parents=True)
    manifest_path(store, "broken", "1").write_text("[]")
    listed = list_artifacts(store)
    assert [(m["name"], m["version"]) for m in listed] == [("broken", "1"), ("dummy", "1")]
    assert "error" in listed[0] and "error" not in listed[1]
    assert list_artifacts(store.parent / "nowhere") == []


# ---------------------------------------------------------------- the cache


def test_model_cache_evicts_the_least_recently_used_unpinned_model() -> None:
    evicted: list[str] = []
    cache: ModelCache[str] = ModelCache(2, on_evict=lambda k, _v: evicted.append(k))
    loads: list[str] = []

    def loader(key: str) -> Any:
        def load() -> str:
            loads.append(key)
            return f"model-{key}"

        return load

    assert cache.get("a", loader("a")) == "model-a"
    assert cache.get("b", loader("b")) == "model-b"
    assert cache.get("a", loader("a")) == "model-a"  # hit: a is now most recent
    cache.get("c", loader("c"))  # evicts b
    assert evicted == ["b"] and cache.keys() == ["a", "c"]
    cache.pin("a")
    cache.get("d", loader("d"))  # a is LRU but pinned: c goes
    assert evicted == ["b", "c"] and cache.keys() == ["a", "d"]
    assert loads == ["a", "b", "c", "d"]
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 4 and stats["loads"] == 4
    assert stats["evictions"] == 2 and stats["pinned"] == ["a"] and stats["models"] == ["a", "d"]

    cache.pin("d")
    with pytest.raises(ModelCacheFull, match="pinned"):
        cache.get("e", loader("e"))
    assert loads == ["a", "b", "c", "d"]  # refused before loading anything
    cache.unpin("a")
    cache.get("e", loader("e"))
    assert cache.keys() == ["d", "e"] and "a" not in cache
    assert cache.evict("d") and not cache.evict("d") and cache.pinned == frozenset()


def test_model_cache_does_not_keep_failed_loads() -> None:
    cache: ModelCache[int] = ModelCache(1)

    def boom() -> int:
        raise RuntimeError("no GPU")

    with pytest.raises(RuntimeError):
        cache.get("x", boom)
    assert "x" not in cache and cache.stats()["load_failures"] == 1
    assert cache.get("x", lambda: 7) == 7
    with pytest.raises(ValueError):
        ModelCache(0)


async def test_model_cache_loads_once_for_concurrent_callers() -> None:
    cache: ModelCache[str] = ModelCache(2)
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "weights"

    got = await asyncio.gather(*(cache.get_async("m", load) for _ in range(5)))
    assert got == ["weights"] * 5 and calls == 1
    assert await cache.get_async("m", load) == "weights" and calls == 1

    async def fail() -> str:
        await asyncio.sleep(0.01)
        raise ArtifactError("digest_mismatch", "tampered")

    results = await asyncio.gather(
        *(cache.get_async("bad", fail) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ArtifactError) for r in results)
    assert "bad" not in cache


# -------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="haif")
    add_artifact_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_list_and_verify(
    tmp_path: Path, source: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "keys" / "cluster.key"
    signer, created = load_or_create_key(key)
    assert created and public_key_path(key) == tmp_path / "keys" / "cluster.pub"
    assert (key.stat().st_mode & 0o777) == 0o600
    assert load_or_create_key(key)[0].key_id == signer.key_id  # reused, not replaced
    root = tmp_path / "store"
    publish(root, "dummy", "1", source, signer)
    capsys.readouterr()

    assert run_cli(["artifacts", "list", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "dummy:1" in out and signer.key_id in out and "not verified" in out
    assert run_cli(["artifacts", "list", "--store", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "dummy"

    verify_args = ["artifacts", "verify", "--store", str(root), "--name", "dummy"]
    verify_args += ["--version", "1", "--keyring", str(key.parent)]
    assert run_cli(verify_args) == 0
    assert "OK dummy:1" in capsys.readouterr().out

    blob = blob_path(root, digest(FILES["config.json"]))
    blob.write_bytes(blob.read_bytes().replace(b"2", b"3"))
    assert run_cli(verify_args) == 1
    err = capsys.readouterr().err
    assert "REFUSED dummy:1 (digest_mismatch)" in err and "config.json" in err

    other = tmp_path / "other"
    other.mkdir()
    (other / "x.pub").write_bytes(make_signer().public_pem)
    assert run_cli([*verify_args[:-1], str(other)]) == 1
    assert "untrusted_signer" in capsys.readouterr().err


def test_cli_publish_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "model"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "sub" / "w.safetensors").write_bytes(b"\0" * 10)
    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "junk").write_text("x")
    key = tmp_path / "k" / "cluster.key"
    root = tmp_path / "store"
    argv = ["artifacts", "publish", "--store", str(root), "--name", "m", "--version", "2"]
    assert run_cli([*argv, "--dir", str(model_dir), "--key", str(key)]) == 0
    assert "published m:2: 2 files" in capsys.readouterr().out
    files = verify(root, "m", "2", Keyring.from_dir(key.parent))
    assert sorted(files) == ["config.json", "sub/w.safetensors"]


# ------------------------------------------------- a worker that needs one


class ArtifactSyntheticEngine(SyntheticEngine):
    """A synthetic engine that, like the real ones, must verify its artifact first."""

    def __init__(self, store: Path, keyring: Keyring) -> None:
        super().__init__(mean_s=0.01, ttft_s=0.0)
        self.store = store
        self.keyring = keyring
        self.files: dict[str, Path] | None = None

    async def load(self) -> None:
        self.files = await asyncio.to_thread(verify, self.store, "dummy", "1", self.keyring)

    async def close(self) -> None:
        self.files = None


class HeartbeatSink:
    """A stand-in orchestrator: records the heartbeats it receives over real RPC."""

    def __init__(self) -> None:
        self.announces: list[Announce] = []

    async def heartbeat(self, body: object) -> None:
        assert isinstance(body, Announce)
        self.announces.append(body)


@pytest.fixture
async def sink() -> AsyncIterator[tuple[HeartbeatSink, str]]:
    receiver = HeartbeatSink()
    app = web.Application()
    add_rpc_routes(app, {"heartbeat": receiver.heartbeat}, {})
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield receiver, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def spec(orchestrator_url: str) -> WorkerSpec:
    return WorkerSpec(
        worker_id="wa",
        region="local",
        url="http://127.0.0.1:1",
        orchestrator_url=orchestrator_url,
        models=("dummy",),
        heartbeat_s=0.05,
    )


async def test_a_worker_with_a_verified_artifact_announces_its_model(
    store: Path, keyring: Keyring, sink: tuple[HeartbeatSink, str]
) -> None:
    receiver, url = sink
    engine = ArtifactSyntheticEngine(store, keyring)
    worker = Worker(spec(url), engine)
    runner = web.AppRunner(build_app(worker))
    await runner.setup()
    try:
        for _ in range(100):
            if receiver.announces:
                break
            await asyncio.sleep(0.02)
        assert receiver.announces and receiver.announces[0].snapshot.models_warm == ("dummy",)
        assert engine.files is not None and worker.ready
        reply = await worker.rpc_infer(Request("r", "t", "dummy", 1, 4, 0.0))
        assert reply.output_tokens == 4
    finally:
        await runner.cleanup()
    assert engine.files is None  # closed with the worker


async def test_a_worker_with_a_tampered_artifact_never_announces(
    store: Path, keyring: Keyring, sink: tuple[HeartbeatSink, str], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, url = sink
    blob = blob_path(store, digest(FILES["model.safetensors"]))
    blob.write_bytes(b"evil" + blob.read_bytes()[4:])
    worker = Worker(spec(url), ArtifactSyntheticEngine(store, keyring))
    runner = web.AppRunner(build_app(worker))
    with pytest.raises(ArtifactError) as info:
        await runner.setup()
    assert info.value.code == "digest_mismatch"
    await asyncio.sleep(0.3)  # six heartbeat periods
    assert receiver.announces == [] and not worker.ready
    assert "not announcing dummy" in caplog.text and "model.safetensors" in caplog.text
    await runner.cleanup()
