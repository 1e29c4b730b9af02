"""One MLflow tracking server for jobs on many nodes.

An sqlite file on a shared filesystem breaks under writers on several hosts (its locks do not
hold over NFS). So while jobs run on other nodes, one `mlflow server` on the controller's host
owns the project's store and the jobs log to it over http:

    with tracking_server(host="0.0.0.0") as server:      # or the interface the nodes reach
        submit(..., env=server.env)                      # MLFLOW_TRACKING_URI=http://<host>:<port>
        ...
        server.check()                                   # raises if the server died

When `MLFLOW_TRACKING_URI` is already an http(s) URI (a team's server), nothing is started and
that URI is passed on. Otherwise the server runs on the store the stages use locally
(`pipeline.core.tracking.tracking_uri()`, `sqlite:///mlflow.db` in the project by default).

The server outlives a controller that dies (it runs in its own session), so submitted jobs
keep logging; it records itself in `logs/mlflow-server.json`, and the next `start_server` on
the same store (a controller re-attaching to its jobs) uses that server instead of starting
another. A controller leaving with jobs still out sets `server.keep = True`; the one that
finishes the bookkeeping stops it. `python -m pipeline.cluster.mlflow_server` runs one in the
foreground (for a long-lived server outside the controller: a tmux window, a service node).

Artifacts are written by the jobs themselves, straight into the project's `mlruns/` on the
shared filesystem: the server gets `--default-artifact-root <project>/mlruns` (the root a local
stage gives new experiments, so experiments made through the server have the same paths as
local ones) and `--no-serve-artifacts`. Proxied artifacts (`mlflow-artifacts:/...` URIs) would
route every checkpoint-sized upload through one process, and would record paths that only a
server can resolve: a later local stage, `pipeline ui` on the sqlite file, or a moved project
(`tracking.relocate`) could no longer read them. With plain paths, the store reads the same
with or without the server, before and after the cluster run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import tracking
from pipeline.core.env import pid_alive


class TrackingServerError(RuntimeError):
    """The tracking server could not start, or stopped while jobs needed it."""


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _connect_host(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard address: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            s.bind((host, port))
        except OSError as e:
            raise TrackingServerError(
                f"cannot start the MLflow tracking server: port {port} on {host} is taken ({e.strerror}). "
                f"Choose another port, or leave it unset to use a free one.") from None


def _answers(url: str, timeout: float = 2.0) -> bool:
    """Whether `url`/health says OK (no proxy: the server is on this host or the cluster's network)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` (or a child of it: uvicorn's workers) listens on `port`. The port
    is picked free before the server binds it, so another server may take it first; then the
    health check answers, but for another store, and the jobs would log there."""
    import psutil

    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="inet")):
                return True
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return False


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def _state_file(project: Path) -> Path:
    return project / "logs" / "mlflow-server.json"


def _me() -> list:
    return [socket.gethostname(), os.getpid()]


def _users(state: Path, add: list | None = None, remove: list | None = None) -> list[list]:
    """The processes using the server `state` records (`[host, pid]` each; on this machine only
    the live ones), with `add` joined and `remove` gone, written back; what is left. Two
    controllers (two studies, a study and a `repro --cluster`) share one server per store: the
    first to finish must not stop it under the other."""
    try:
        info = json.loads(state.read_text())
    except (OSError, ValueError):
        return []
    here = socket.gethostname()
    users = [u for u in info.get("users", []) if u != remove and (u[0] != here or pid_alive(int(u[1])))]
    if add is not None and add not in users:
        users.append(add)
    info["users"] = users
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, state)
    return users


@dataclass
class TrackingServer:
    """What jobs need to log to the tracking store: `uri`, and `env` to add to their environment.
    `pid` is None for a server this code did not start (an http URI from the environment);
    `process` is None as well for a server started by an earlier controller and attached to.
    `keep`: leave it running at the end of `tracking_server` (jobs still out)."""

    uri: str
    process: subprocess.Popen | None = None
    log: Path | None = None
    store: str | None = None  # the backend store URI the server runs on
    pid: int | None = None  # its process group
    host: str | None = None  # the machine it runs on
    state: Path | None = None  # the file that records it, for the next controller
    keep: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def check(self) -> None:
        """Raise TrackingServerError when the server this code started or attached to is no
        longer running."""
        if self.pid is None or self._stopped:
            return
        if self.process is not None:
            if self.process.poll() is None:
                return
            how = f"exited with code {self.process.returncode}"
        elif _answers(self.uri, timeout=10):
            return
        else:
            how = "no longer answers"
        raise TrackingServerError(
            f"the MLflow tracking server ({self.uri}, store {self.store}) {how}; jobs can no longer "
            f"log their runs. Its log, {self.log}:\n{_tail(self.log)}")

    def stop(self) -> None:
        """Stop the server and the workers it started (its whole process group), then delete for
        good the runs the jobs replaced (a server only soft-deletes them)."""
        if self.pid is None or self._stopped:
            return
        if self.host != socket.gethostname():
            raise TrackingServerError(
                f"the MLflow tracking server {self.uri} runs on {self.host}, not here: stop it there "
                f"(kill -TERM -{self.pid}).")
        self._stopped = True
        if self.state is not None and self.state.exists() and _users(self.state, remove=_me()):
            return  # another live controller still uses it: the last one stops it
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            if self._wait(wait):
                break
        if self.state is not None:
            self.state.unlink(missing_ok=True)
        if self.store:
            tracking.purge_replaced(self.store)

    def _wait(self, seconds: float) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout=seconds)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + seconds
        while pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


def _attach(project: Path, store: str) -> TrackingServer | None:
    """The server an earlier `start_server` left running on `store` (recorded in the state
    file), when it still answers; None otherwise."""
    state = _state_file(project)
    try:
        info = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if info.get("store") != store or not isinstance(pid, int) or pid <= 0:
        return None
    if info.get("host") == socket.gethostname() and not pid_alive(pid):
        return None
    if not _answers(info["uri"], timeout=10):
        return None
    log = Path(info["log"]) if info.get("log") else None
    _users(state, add=_me())
    return TrackingServer(info["uri"], None, log, store, pid, info.get("host"), state)


def start_server(project: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 advertise: str | None = None, workers: int = 1, log: Path | None = None,
                 timeout_s: float = 120.0) -> TrackingServer:
    """Start `mlflow server` on the project's tracking store, wait until it answers, return it.

    `host`: the interface to bind (127.0.0.1 when everything runs on this machine; the address
    of the interface the compute nodes reach, or 0.0.0.0, on a cluster). `advertise`: the name
    jobs use to reach it (default: `host`, or this machine's fully qualified name when `host`
    is a wildcard); it must resolve to this machine on the nodes. `port`: None picks a free one.
    One worker by default: the sqlite store takes one writer at a time anyway.
    When MLFLOW_TRACKING_URI is an http(s) URI already, starts nothing and returns it."""
    uri = tracking.tracking_uri()
    if _is_http(uri):
        return TrackingServer(uri)
    project = Path(project or Path.cwd()).resolve()
    db = tracking._sqlite_file(uri)
    if db is not None:
        uri = f"sqlite:///{db}"  # the file a stage here opens, whatever the server's working directory
    running = _attach(project, uri)
    if running is not None:
        return running
    if db is not None:
        tracking.relocate(uri)  # a moved project: fix its paths before the server owns the store
        tracking.purge_replaced(uri)
    if port is None:
        port = _free_port(host)
    else:
        _check_port(host, port)
    if advertise is None:
        advertise = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    from mlflow.server.security_utils import get_default_allowed_hosts

    allowed = get_default_allowed_hosts() + [advertise, f"{advertise}:{port}"]
    log = Path(log or project / "logs" / "mlflow-server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", str(project / "mlruns"), "--no-serve-artifacts",
           "--host", host, "--port", str(port), "--workers", str(workers),
           "--allowed-hosts", ",".join(allowed)]
    with open(log, "ab") as out:
        out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        # no GenAI job runner (huey consumers: online scoring, trace archival): the pipeline
        # has no such jobs, and each would be one more process writing the store
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = TrackingServer(f"http://{_url_host(advertise)}:{port}", proc, log, uri, proc.pid,
                            socket.gethostname(), _state_file(project))
    local = f"http://{_url_host(_connect_host(host))}:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while not (_answers(local) and _listens(proc.pid, port)):
            if proc.poll() is not None:
                raise TrackingServerError(
                    f"the MLflow tracking server on {host}:{port} (store {uri}) exited with code "
                    f"{proc.returncode} while starting. Its log, {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise TrackingServerError(
                    f"the MLflow tracking server on {host}:{port} (store {uri}) did not answer within "
                    f"{timeout_s:.0f} s. Its log, {log}:\n{_tail(log)}")
            time.sleep(0.25)
        if server.uri != local and not _answers(server.uri, timeout=10):
            raise TrackingServerError(
                f"the MLflow tracking server answers on {local} but not at {server.uri}, the address jobs "
                f"would use: bind an interface the compute nodes reach (host) and give a name that "
                f"resolves to this machine there (advertise).")
    except BaseException:
        server.stop()
        raise
    server.state.write_text(json.dumps({"uri": server.uri, "store": uri, "pid": proc.pid, "host": server.host,
                                        "log": str(log), "users": [_me()]}, indent=1) + "\n")
    return server


@contextmanager
def tracking_server(project: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                    advertise: str | None = None, workers: int = 1, log: Path | None = None,
                    timeout_s: float = 120.0) -> Iterator[TrackingServer]:
    """`start_server` for the length of a `with` block; stopped on the way out, whatever happens,
    unless `server.keep` was set (jobs still out: the next controller attaches to it).
    Leaving the block normally after the server died raises TrackingServerError (runs the jobs
    logged meanwhile are missing)."""
    server = start_server(project, host, port, advertise, workers, log, timeout_s)
    try:
        yield server
        server.check()
    finally:
        if not server.keep:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.cluster.mlflow_server",
        description="Run an MLflow tracking server on this project's store (MLFLOW_TRACKING_URI, else "
                    "sqlite:///mlflow.db) until Ctrl-C or SIGTERM, for jobs on other nodes: they log to the "
                    "URI it prints. Artifacts go to the project's mlruns/ (a shared filesystem).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind: 127.0.0.1 (this machine only, the default), the address the "
                             "compute nodes reach, or 0.0.0.0 (all)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument("--advertise", default=None,
                        help="the name jobs reach this machine by (default: --host, or this machine's fully "
                             "qualified name for 0.0.0.0)")
    args = parser.parse_args(argv)
    try:
        server = start_server(Path.cwd(), args.host, args.port, args.advertise)
    except TrackingServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if server.process is None:
        print(f"already running: export MLFLOW_TRACKING_URI={server.uri}", flush=True)
        return 0
    print(f"export MLFLOW_TRACKING_URI={server.uri}", flush=True)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            server.check()
            time.sleep(5)
    except KeyboardInterrupt:
        return 0
    except TrackingServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
