"""A real S3 API server for tests: moto in server mode (a subprocess) behind a TCP proxy.

Moto keeps its data in the server process, so stopping and restarting it would lose every bucket.
S3 being *down* is therefore simulated by the proxy in front of it: `down()` closes the proxy's
listening socket (new connections are refused, as with a stopped server) and cuts every open
connection (pooled keep-alive connections fail, as after a crash); `up()` listens again on the
same port. Moto itself keeps running, so the data is the same after `up()`.

`endpoint_url` (and `env()`) point at the proxy; `client()` and `make_bucket()` talk to moto
directly, so a test can set up or inspect buckets while S3 is "down".
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    import pytest
    from mypy_boto3_s3 import S3Client

__all__ = ["MotoServer"]

HOST = "127.0.0.1"
REGION = "us-east-1"
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"  # dummy: moto does not check signatures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("GET", "/moto-api/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


# what could point an S3 client somewhere else than the test's server
_AWS_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
)


class _Proxy:
    """Forwards TCP connections from `port` to `target`; `pause()` makes the port refuse them."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()

    @property
    def running(self) -> bool:
        return self._listener is not None

    def resume(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))  # port 0 the first time, the same port afterwards
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._accept, args=(listener, self._stop), name="s3-proxy", daemon=True
        )
        self._thread.start()

    def pause(self) -> None:
        listener, thread = self._listener, self._thread
        if listener is None:
            return
        self._stop.set()
        if thread is not None:
            thread.join()
        listener.close()
        self._listener = self._thread = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection((HOST, self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        # one side finished or failed: end the whole connection
        with self._lock:
            self._conns.discard(src)
            self._conns.discard(dst)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class MotoServer:
    """moto's S3 over real HTTP on 127.0.0.1, with `down()`/`up()` to simulate an outage."""

    def __init__(self, startup_timeout: float = 20.0) -> None:
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="moto-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log.name)
        self._proc: subprocess.Popen[bytes] | None = None
        self.moto_port = 0
        for _ in range(3):  # the chosen port may be taken before moto binds it
            self.moto_port = _free_port()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.moto_port)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self._credentials()},
            )
            if self._wait(startup_timeout):
                break
            self._stop_moto()
        else:
            log = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto server did not start; its log:\n{log}")
        self._proxy = _Proxy(self.moto_port)
        try:
            self._proxy.resume()
        except BaseException:
            self._stop_moto()
            raise
        self.port = self._proxy.port
        self.endpoint_url = f"http://{HOST}:{self.port}"
        self._direct: S3Client | None = None

    @staticmethod
    def _credentials() -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if _answers(self.moto_port):
                return True
            time.sleep(0.05)
        return False

    def _stop_moto(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ------------------------------------------------------------------------------ for tests

    def env(self) -> dict[str, str]:
        """Environment for an S3 client (boto3, `open_store("s3://…")`) of this server."""
        return {**self._credentials(), "AWS_ENDPOINT_URL": self.endpoint_url}

    def isolate(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """This server's AWS environment for the test, and nothing from the developer's."""
        for var in _AWS_ENV_VARS:
            monkeypatch.delenv(var, raising=False)
        for var, value in self.env().items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def client(self) -> S3Client:
        """A boto3 client talking to moto directly (works while the server is `down()`)."""
        if self._direct is None:
            self._direct = boto3.session.Session(
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
            ).client(
                "s3",
                endpoint_url=f"http://{HOST}:{self.moto_port}",
                config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
            )
        return self._direct

    def make_bucket(self, name: str, object_lock: bool = False) -> str:
        """Create a bucket (Object Lock enabled if asked; that also turns on versioning)."""
        try:
            self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        return name

    @property
    def is_up(self) -> bool:
        return self._proxy.running

    def down(self) -> None:
        """S3 unavailable: connections to `endpoint_url` are refused, open ones are cut."""
        self._proxy.pause()

    def up(self) -> None:
        """S3 back on the same port, with the same data."""
        self._proxy.resume()

    def close(self) -> None:
        self._proxy.pause()
        self._stop_moto()
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
