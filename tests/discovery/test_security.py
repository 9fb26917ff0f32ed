"""TLS (test CA, server and client certificates) and user/password auth, end to end on a real etcd."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from discovery.client import EtcdAuthError, EtcdClient, EtcdUnavailable
from discovery.config import EtcdConfig
from discovery.embedded import EmbeddedEtcd, TLSFiles, etcd_binary
from discovery.informer import Informer
from discovery.lease import LeaseSession

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _make_cert(d: Path, name: str, ca: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "server", "ca", "localhost",
               "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _make_cert(d, "client", "ca", "distserve-agent", "extendedKeyUsage=clientAuth\n")
    _make_cert(d, "rogue", "other-ca", "rogue", "extendedKeyUsage=clientAuth\n")
    return d


@pytest.fixture
def tls_etcd(pki):
    server = EmbeddedEtcd(
        tls=TLSFiles(cert=str(pki / "server.crt"), key=str(pki / "server.key"), ca=str(pki / "ca.crt"),
                     client_cert_auth=True),
        unsafe_no_fsync=True,
    ).start()
    try:
        yield server
    finally:
        server.stop()


async def test_mutual_tls_end_to_end(tls_etcd, pki):
    assert tls_etcd.client_url.startswith("https://")
    cfg = EtcdConfig(endpoints=tls_etcd.endpoints, ca_cert=str(pki / "ca.crt"), cert=str(pki / "client.crt"),
                     key=str(pki / "client.key"), timeout=5.0)
    async with EtcdClient(cfg) as client, Informer(client, "/tls/") as inf:
        await inf.wait_synced(5)
        async with LeaseSession(client, ttl=5) as session:
            await session.put("/tls/registered", b"over mTLS")
            for _ in range(100):
                if inf.get("/tls/registered") == b"over mTLS":
                    break
                await asyncio.sleep(0.02)
            assert inf.get("/tls/registered") == b"over mTLS"
            assert (await client.get("/tls/registered")).lease == session.lease_id
        assert await client.get("/tls/registered") is None


@pytest.mark.parametrize("variant", ["no client certificate", "client certificate from another CA",
                                     "server not trusted", "plain text"])
async def test_tls_refuses_what_it_should(tls_etcd, pki, variant):
    endpoint = tls_etcd.client_url
    kwargs: dict = {"ca_cert": str(pki / "ca.crt"), "cert": str(pki / "client.crt"), "key": str(pki / "client.key")}
    if variant == "no client certificate":
        kwargs.pop("cert"), kwargs.pop("key")
    elif variant == "client certificate from another CA":
        kwargs.update(cert=str(pki / "rogue.crt"), key=str(pki / "rogue.key"))
    elif variant == "server not trusted":
        kwargs.update(ca_cert=str(pki / "other-ca.crt"))
    else:
        kwargs = {}
        endpoint = endpoint.replace("https://", "http://")
    async with EtcdClient(EtcdConfig(endpoints=[endpoint], timeout=1.0, **kwargs)) as client:
        with pytest.raises((EtcdUnavailable, EtcdAuthError)):
            await client.put("/tls/x", b"must not land")


def _etcdctl(etcd: EmbeddedEtcd, *args: str, user: str | None = None) -> None:
    cmd = [etcd_binary("etcdctl"), f"--endpoints={etcd.client_url}", *args]
    if user:
        cmd.insert(2, f"--user={user}")
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def auth_etcd():
    # simple tokens live 2 s here (300 s by default), so the test sees one expire
    server = EmbeddedEtcd(unsafe_no_fsync=True, extra_args=["--auth-token-ttl=2"]).start()
    try:
        _etcdctl(server, "user", "add", "root", "--new-user-password=r00t-pw")
        _etcdctl(server, "user", "add", "alice", "--new-user-password=s3cret-pw")
        _etcdctl(server, "role", "add", "app")
        _etcdctl(server, "role", "grant-permission", "app", "--prefix=true", "readwrite", "/app/")
        _etcdctl(server, "user", "grant-role", "alice", "app")
        _etcdctl(server, "auth", "enable")
        yield server
    finally:
        server.stop()


async def test_user_password_auth_with_token_refresh(auth_etcd, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = EtcdConfig(endpoints=auth_etcd.endpoints, user="alice", password="s3cret-pw", timeout=5.0,
                     token_refresh_interval=600)  # only on-demand refresh can save the expired token below
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in cfg.describe()
    async with EtcdClient(cfg) as client, Informer(client, "/app/") as inf:
        await inf.wait_synced(5)
        async with LeaseSession(client, ttl=5) as session:
            await session.put("/app/engine", b"alice's")
            first_token = client._token
            await asyncio.sleep(3)  # the token expires (2 s TTL)
            await client.put("/app/after-expiry", b"still works")
            assert client._token != first_token
            assert (await client.get("/app/engine")).lease == session.lease_id
            with pytest.raises(EtcdAuthError, match="permission denied"):
                await client.put("/elsewhere", b"not allowed")
            for _ in range(100):
                if "/app/after-expiry" in inf:
                    break
                await asyncio.sleep(0.02)
            assert set(inf.items()) == {"/app/engine", "/app/after-expiry"}
    assert "s3cret-pw" not in caplog.text


async def test_bad_or_missing_credentials_are_clear_errors(auth_etcd):
    wrong = EtcdConfig(endpoints=auth_etcd.endpoints, user="alice", password="wrong-pw", timeout=2.0)
    with pytest.raises(EtcdAuthError) as info:
        async with EtcdClient(wrong):
            pass
    assert "wrong-pw" not in str(info.value)
    async with EtcdClient(EtcdConfig(endpoints=auth_etcd.endpoints, timeout=2.0)) as anonymous:
        with pytest.raises(EtcdAuthError, match="etcd-user"):
            await anonymous.put("/app/x", b"1")
