"""Real Ray and MLflow processes on 127.0.0.1 for integration tests; each stops what it started."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
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


_EMPTY_STORE: list[Path] = []  # the template, once this process has made it


def empty_mlflow_store(path: Path) -> None:
    """Put an empty MLflow SQLite store (its tables created) at `path`, unless a file is there.

    A new store costs MLflow about 7 s of schema migrations, paid by every sweep or server that
    starts from nothing; the template is made once per test session and copied. Tests of what
    happens where no store exists yet (the bad-input table, `best` of a study never tracked) do not
    use it."""
    path = Path(path)
    if path.exists():
        return
    if not _EMPTY_STORE:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="empty-mlflow-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables
        _EMPTY_STORE.append(template)
    shutil.copyfile(_EMPTY_STORE[0], path)


def start_sweep(space_file, cwd, cache_dir, *extra, env: dict | None = None, premade_store: bool = True) -> subprocess.Popen:
    """`irrep-study sweep SPACE --json` in the background (stderr to cwd/sweep.log), in its own
    process group: killing the group takes the local Ray it started with it. Without
    `--tracking-uri` it tracks to cwd/mlflow.db: an empty store made beforehand if none is there,
    unless `premade_store` is false (the sweep then creates it, as on a user's first sweep)."""
    if premade_store and "--tracking-uri" not in extra:
        empty_mlflow_store(Path(cwd) / "mlflow.db")
    env = {**os.environ, "IRREP_STUDY_CACHE": str(cache_dir), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "study.cli", "sweep", str(space_file), "--num-cpus", "1", "--json", *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(cwd / "sweep.log", "a"),
        text=True,
        start_new_session=True,
    )


def sweep_report(sweep: subprocess.Popen, cwd: Path, expect: int = 0, timeout: float = 600) -> dict:
    """Wait for a sweep started by `start_sweep`, check its exit code and return its JSON report
    (the whole process group is killed if it does not end in time)."""
    try:
        stdout, _ = sweep.communicate(timeout=timeout)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, 9)
    assert sweep.returncode == expect, (Path(cwd) / "sweep.log").read_text()[-3000:]
    return json.loads(stdout)


def kill_sweep_and_wait(sweep: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL a sweep started by `start_sweep` and everything it started (its process group and
    any descendant that left it), and return only once every one of them is gone, so that nothing
    of it writes to the store after this returns."""
    import psutil

    try:
        tree = [psutil.Process(sweep.pid), *psutil.Process(sweep.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # the sweep already ended (and was reaped by poll())
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sweep.pid, signal.SIGKILL)
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    sweep.wait(timeout=timeout)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    assert not alive, f"still alive {timeout} s after SIGKILL: {alive}"


def epochs_logged(client, run) -> list[int]:
    """The epochs a trial run logged its validation MAE for, in order (each once, normally)."""
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mae_meV"))


def grid_space(folder: Path, name: str, l_sets: list[list[int]], epochs: int, subset: int = 1500, **resources) -> Path:
    """A grid search space of tiny trials (hidden 4, one layer), one entry per l set, no early
    stopping, written to folder/space.yaml."""
    import yaml

    space = Path(folder) / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "trial": {"hidden_dim": 4, "num_layers": 1, "subset": subset, "epochs": epochs},
                "search": {"method": "grid", "grid": [{"l_values": l_values} for l_values in l_sets]},
                "scheduler": {"type": "none"},
                "resources": resources,
            }
        )
    )
    return space


def trial_runs_of(client, name: str, deleted_too: bool = False) -> list:
    """The trial runs of experiment `name` (none before it exists), deleted ones too if asked."""
    from mlflow.entities import ViewType

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`irrep_study.role` = 'trial'",
        run_view_type=ViewType.ALL if deleted_too else ViewType.ACTIVE_ONLY,
    )


def wait_for_epochs(sweep: subprocess.Popen, cwd: Path, runs_of, epochs: int, trials: int = 1, timeout: float = 300) -> None:
    """Until `trials` trial runs (`runs_of()` -> (client, runs)) have logged `epochs` epochs each;
    fails at once, with the end of its log, if the sweep process ends first."""

    def logged():
        assert sweep.poll() is None, (Path(cwd) / "sweep.log").read_text()[-3000:]
        client, runs = runs_of()
        done = [run for run in runs if len(epochs_logged(client, run)) >= epochs]
        return len(done) >= trials

    wait_until(logged, timeout, f"{trials} trial(s) with {epochs} logged epoch(s)")


class RayCluster:
    """A head node and `workers` more nodes, each with `cpus` CPUs, in a private temp dir.

    `gpus`: logical GPUs per node, which Ray schedules (and names in CUDA_VISIBLE_DEVICES) without
    any real GPU; None lets Ray detect the machine's own."""

    def __init__(self, workers: int = 1, cpus: int = 1, gpus: int | None = None):
        # Ray's socket paths must stay short (108 bytes), hence a short folder under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray 2.60 turns on token authentication for `ray start --head`; every process that joins or
        # drives the cluster must then run in token mode with the same token. A token of the
        # cluster's own, not ~/.ray/auth_token: a fresh machine (CI's) has none, and `ray start`
        # refuses to run without one.
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.client_env}
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--disable-usage-stats"]
        if gpus is not None:
            common += ["--num-gpus", str(gpus)]
        self._ray(
            "start",
            "--head",
            "--port",
            str(self.port),
            "--temp-dir",
            self.temp_dir,
            "--include-dashboard",
            "false",
            "--ray-client-server-port",
            str(free_port()),
            # Not Ray's fixed 8265 (with no retries): two clusters on one machine would collide there.
            "--dashboard-port",
            str(free_port()),
            *common,
        )
        for _ in range(workers):
            self._ray("start", "--address", self.address, *common)

    def _ray(self, *args: str) -> None:
        subprocess.run([str(BIN / "ray"), *args], check=True, env=self.env, capture_output=True, timeout=180)

    def _named_processes(self):
        """(process, its command line) of each process named by this cluster's temp dir or its
        GCS port (Ray's client server); the command line ends with a space."""
        import psutil

        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or []) + " "
            if f"{self.temp_dir}/" in cmdline or f":{self.port} " in cmdline:
                yield process, cmdline

    def processes(self) -> list:
        """This cluster's processes and everything they started (workers, agents)."""
        import psutil

        found: dict[int, psutil.Process] = {}
        for process, _ in self._named_processes():
            try:
                for one in [process, *process.children(recursive=True)]:
                    found[one.pid] = one
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def node_processes(self, index: int) -> list:
        """The raylet of this cluster's `index`-th joined node and everything it started
        (its workers)."""
        for process, cmdline in self._named_processes():
            if f"sockets/raylet.{index} " in cmdline:
                return [process, *process.children(recursive=True)]
        raise AssertionError(f"no raylet of node {index} in {self.temp_dir}")

    def stop(self) -> None:
        """Stop this cluster's processes only: `ray stop` would stop every Ray on the machine, a
        developer's own and those of another test run beside this one too."""
        import psutil

        processes = self.processes()
        for process in processes:  # SIGKILL, as `ray stop --force` does: some do not heed SIGTERM
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=30)
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
        empty_mlflow_store(self.root / "mlflow.db")  # its tables made once per session, not per server
        self.log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Without MLflow 3's job runner and its huey consumer: two more processes that import
            # MLflow at each start (seconds of CPU on 2 cores), for server-side jobs no test uses.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
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


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of a server, to play a slow or failing tracking server.

    `delay`: seconds each request waits before it is forwarded. `refuse`: an HTTP status (e.g.
    503) answered without forwarding, as a load balancer does while its backend is down.
    `lose_responses`: for requests whose path contains this text, forward the request, then answer
    502 instead of the server's response (the server did the work; the client cannot know).
    `requests` records (method, path, what happened)."""

    def __init__(self, target_port: int):
        import http.server
        import threading

        self.target_port = target_port
        self.delay = 0.0
        self.refuse: int | None = None
        self.lose_responses: str | None = None
        self.requests: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(proxy.delay)
                if proxy.refuse is not None:
                    proxy.requests.append((self.command, self.path, "refused"))
                    self._answer(proxy.refuse, b"unavailable", {})
                    return
                status, headers, payload = proxy._forward(self.command, self.path, dict(self.headers), body)
                if proxy.lose_responses is not None and proxy.lose_responses in self.path:
                    proxy.requests.append((self.command, self.path, "lost"))
                    self._answer(502, b"bad gateway", {})
                    return
                proxy.requests.append((self.command, self.path, "forwarded"))
                self._answer(status, payload, headers)

            def _answer(self, status: int, payload: bytes, headers: dict):
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _forward(self, method: str, path: str, headers: dict, body: bytes):
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=60)
        try:
            headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def count(self, what: str) -> int:
        return sum(1 for _, _, happened in self.requests if happened == what)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
