"""distserve-ctl over mutual TLS and with user/password auth (options and DISTSERVE_ETCD_* variables)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from discovery.embedded import EmbeddedEtcd, TLSFiles, etcd_binary
from tests.ctl.conftest import run_ctl, run_ctl_inprocess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ctl-pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=ctl-ca")
    for name, cn, ext in (("server", "localhost", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                          ("client", "ops", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(ext)
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return d


def test_mutual_tls_by_options_and_by_environment(pki, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    server = EmbeddedEtcd(tls=TLSFiles(cert=str(pki / "server.crt"), key=str(pki / "server.key"),
                                       ca=str(pki / "ca.crt"), client_cert_auth=True), unsafe_no_fsync=True).start()
    try:
        url = server.client_url
        opts = ("--etcd-ca", str(pki / "ca.crt"), "--etcd-cert", str(pki / "client.crt"), "--etcd-key",
                str(pki / "client.key"))
        assert run_ctl_inprocess(url, *opts, "cordon", "E1", "--force").rc == 0
        res = run_ctl_inprocess(url, *opts, "doctor", "--json")  # its etcd clock probe speaks mTLS too
        assert "clock" in res.json()["checks"] and res.json()["checks"]["etcd"] == "ok"
        # the same from DISTSERVE_ETCD_* variables, as its own process
        res = run_ctl(url, "export", DISTSERVE_ETCD_CA=str(pki / "ca.crt"), DISTSERVE_ETCD_CERT=str(pki / "client.crt"),
                      DISTSERVE_ETCD_KEY=str(pki / "client.key"))
        assert res.rc == 0, res.err
        assert [k["key"].rsplit("/", 2)[-2:] for k in res.json()["keys"]] == [["state", "E1"]]
        # without a client certificate: one line, exit 2
        res = run_ctl(url, "--etcd-ca", str(pki / "ca.crt"), "--etcd-timeout", "2", "engines")
        assert res.rc == 2 and len(res.err.strip().splitlines()) == 1 and url in res.err
    finally:
        server.stop()


def test_user_password_from_option_and_environment():
    server = EmbeddedEtcd(unsafe_no_fsync=True).start()
    try:
        def etcdctl(*args: str, user: str | None = None) -> None:
            cmd = [etcd_binary("etcdctl"), f"--endpoints={server.client_url}", *args]
            if user:
                cmd.insert(2, f"--user={user}")
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)

        etcdctl("user", "add", "root", "--new-user-password=r00t-pw")
        etcdctl("user", "add", "ops", "--new-user-password=0ps-secret")
        etcdctl("role", "add", "ops")
        etcdctl("role", "grant-permission", "ops", "--prefix=true", "readwrite", "/distserve/")
        etcdctl("user", "grant-role", "ops", "ops")
        etcdctl("auth", "enable")
        url = server.client_url
        res = run_ctl(url, "--etcd-user", "ops", "cordon", "E1", "--force", DISTSERVE_ETCD_PASSWORD="0ps-secret")
        assert res.rc == 0, res.err
        res = run_ctl(url, "engines", DISTSERVE_ETCD_USER="ops", DISTSERVE_ETCD_PASSWORD="0ps-secret")
        assert res.rc == 0 and res.json()["engines"] == []
        res = run_ctl(url, "--etcd-user", "ops", "--etcd-password", "not-it", "--etcd-timeout", "2", "engines")
        assert res.rc == 2 and len(res.err.strip().splitlines()) == 1
        assert "not-it" not in res.err and "authentication failed" in res.err.lower()
        res = run_ctl(url, "--etcd-timeout", "2", "engines")  # no credentials at all
        assert res.rc == 2 and "etcd-user" in res.err
    finally:
        server.stop()
