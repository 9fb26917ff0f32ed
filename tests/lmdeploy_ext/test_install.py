"""Version gate, protocol choice and the launcher's behaviour where lmdeploy is absent or present."""

import importlib.util
import subprocess
import sys

import pytest

from distserve.lmdeploy_ext.install import UnsupportedLmdeploy, check_version, resolve_protocol
from distserve.lmdeploy_ext.serve import _pop_option
from tests.util import REPO

HAVE_LMDEPLOY = importlib.util.find_spec("lmdeploy") is not None


@pytest.mark.parametrize("version", ["0.17.0", "0.17.3", "0.18.0", "0.18.9rc1"])
def test_supported_versions(version):
    assert check_version(version) >= (0, 17)


@pytest.mark.parametrize("version", ["0.16.2", "0.19.0", "1.0.0", "dev"])
def test_unsupported_versions_are_refused(version):
    with pytest.raises(UnsupportedLmdeploy, match=">=0.17,<0.19"):
        check_version(version)


def test_protocol_choice():
    assert resolve_protocol("TCP") == "tcp" and resolve_protocol("rdma") == "rdma"
    assert resolve_protocol("auto") in ("tcp", "rdma")  # rdma only where DLSlime sees an RDMA NIC
    with pytest.raises(ValueError, match="auto, tcp, rdma or nvlink"):
        resolve_protocol("carrier-pigeon")


def test_launcher_strips_only_its_own_option():
    argv = ["api_server", "/m", "--migration-protocol", "tcp", "--role", "Prefill"]
    assert _pop_option(argv, "--migration-protocol", "auto") == "tcp"
    assert argv == ["api_server", "/m", "--role", "Prefill"]
    argv = ["api_server", "--migration-protocol=rdma"]
    assert _pop_option(argv, "--migration-protocol", "auto") == "rdma" and argv == ["api_server"]


def run_launcher(*args):
    return subprocess.run(
        [sys.executable, "-m", "distserve.lmdeploy_ext.serve", *args],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_launcher_help():
    out = run_launcher("--help")
    assert out.returncode == 0 and "--migration-protocol" in out.stdout


@pytest.mark.skipif(HAVE_LMDEPLOY, reason="lmdeploy is installed here")
def test_launcher_without_lmdeploy_is_one_clear_line():
    out = run_launcher("api_server", "/nonexistent", "--role", "Prefill")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "pip install 'distserve[lmdeploy]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_launcher_bad_protocol_is_one_clear_line():
    out = run_launcher("api_server", "/m", "--migration-protocol", "udp")
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.startswith("error:")


@pytest.mark.skipif(not HAVE_LMDEPLOY, reason="lmdeploy is not installed (GPU nodes only)")
def test_backend_registered_under_lmdeploys_default_name():
    from distserve.lmdeploy_ext.install import install_engine_side

    install_engine_side()
    from lmdeploy.pytorch.disagg.backend.backend import MIGRATION_BACKENDS

    cls = MIGRATION_BACKENDS.module_dict["DLSlime"]
    assert cls.__name__ == "DistserveMigrationBackend" and hasattr(cls(), "links")


class _ZmqThing:
    """Stands in for a ZMQ socket or context (pyzmq/lmdeploy are not installed where CI runs)."""

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True

    term = close


def _conn_class(async_disconnect: bool):
    """The shape of lmdeploy's EngineP2PConnection around p2p_drop_connect: 0.17 (async zmq_disconnect,
    called without await) or 0.18 (plain method). Stand-in: lmdeploy is not installed where CI runs;
    the real 0.17 class was checked the same way on CPU, and on the GPU by tools/gpu_smoke.sh."""

    class Conn:
        def __init__(self):
            self.p2p_conn_ctx = {"P": _ZmqThing()}
            self.p2p_sender = {"P": _ZmqThing()}
            self.p2p_receiver = {"P": _ZmqThing()}

        def _close(self, remote_engine_id):
            for d in (self.p2p_receiver, self.p2p_sender, self.p2p_conn_ctx):
                d[remote_engine_id].close()

        def p2p_drop_connect(self, remote_engine_id):
            self.zmq_disconnect(remote_engine_id)  # as lmdeploy does: no await
            return {"success": True}

    if async_disconnect:

        async def zmq_disconnect(self, remote_engine_id):
            self._close(remote_engine_id)
    else:

        def zmq_disconnect(self, remote_engine_id):
            self._close(remote_engine_id)

    Conn.zmq_disconnect = zmq_disconnect
    return Conn


def closed(conn):
    return [d["P"].closed for d in (conn.p2p_receiver, conn.p2p_sender, conn.p2p_conn_ctx)]


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_lmdeploy_017_drop_connect_closes_the_links_sockets():
    from distserve.lmdeploy_ext.install import fix_unawaited_zmq_disconnect

    cls = _conn_class(async_disconnect=True)
    leaky = cls()
    leaky.p2p_drop_connect("P")
    assert closed(leaky) == [False, False, False]  # the 0.17 defect: nothing closed
    assert fix_unawaited_zmq_disconnect(cls) is True
    conn = cls()
    assert conn.p2p_drop_connect("P") == {"success": True}
    assert closed(conn) == [True, True, True]


def test_lmdeploy_018_drop_connect_left_as_it_is():
    from distserve.lmdeploy_ext.install import fix_unawaited_zmq_disconnect

    cls = _conn_class(async_disconnect=False)
    original = cls.zmq_disconnect
    assert fix_unawaited_zmq_disconnect(cls) is False and cls.zmq_disconnect is original
    conn = cls()
    conn.p2p_drop_connect("P")
    assert closed(conn) == [True, True, True]
