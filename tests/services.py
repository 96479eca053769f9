"""Real Ray and MLflow processes on 127.0.0.1 for integration tests; each stops what it started."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


class RayCluster:
    """A head node and `workers` more nodes, each with `cpus` CPUs, in a private temp dir.

    `gpus`: logical GPUs per node, which Ray schedules (and names in CUDA_VISIBLE_DEVICES) without
    any real GPU; None lets Ray detect the machine's own."""

    def __init__(self, workers: int = 1, cpus: int = 1, gpus: int | None = None):
        # Ray's socket paths must stay short (108 bytes), hence a short folder under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray 2.60 turns on token authentication for `ray start --head` (token in ~/.ray/auth_token);
        # every process that joins or drives the cluster must then run in token mode too.
        self.client_env = {"RAY_AUTH_MODE": "token"}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.client_env}
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--disable-usage-stats"]
        if gpus is not None:
            common += ["--num-gpus", str(gpus)]
        self._ray(
            "start", "--head", "--port", str(self.port), "--temp-dir", self.temp_dir,
            "--include-dashboard", "false", "--ray-client-server-port", str(free_port()), *common,
        )
        for _ in range(workers):
            self._ray("start", "--address", self.address, *common)

    def _ray(self, *args: str) -> None:
        subprocess.run([str(BIN / "ray"), *args], check=True, env=self.env, capture_output=True, timeout=180)

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` with a SQLite store and a local artifact folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
            ],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(self.healthy, 120, "mlflow server")

    def healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
        self.log.close()
