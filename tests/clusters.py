"""Real multi-process clusters on this machine for the cluster tests: a Spark standalone master with workers, and a
Ray head with a second node. Each is started as subprocesses of the test and stopped by their process ids
(terminate, wait, kill), then any process still running from the cluster's own directory is killed by pid.

Proof that every worker / node ran tasks comes from records the frameworks write themselves:

* Spark: the driver's event log (``spark.eventLog.*``, plain JSON lines, the file the history server reads) names
  the executor of every finished task; each worker's ``--work-dir`` holds ``<app-id>/<executor-id>/`` for the
  executors it launched, so successful tasks map to workers.
* Ray: Ray's export API (``RAY_enable_export_api_write_config=EXPORT_TASK,EXPORT_NODE``) writes JSON lines under
  ``<session>/logs/export_events/``: every node that joined (``EXPORT_NODE``) and every task's states with the node
  that ran it (``EXPORT_TASK``). Ray 2.60 without ``ray[default]`` has no dashboard, so ``ray.util.state`` is not
  available; the export files need nothing more than the core.

Ray on 127.0.0.1, what we found (Ray 2.60):

* ``--node-ip-address=127.0.0.1`` is silently replaced: ``ray start`` and ``ray.init(address=...)`` both pass
  addresses through ``ray._private.services.resolve_ip_for_localhost``, which turns 127.0.0.1 / localhost into the
  host's outbound address (192.0.2.2 on the test machine; with no route out it stays 127.0.0.1). The GCS and the
  raylets listen on all interfaces, so ``127.0.0.1:PORT`` works as the address to give a driver, and the nodes are
  registered under the host's address. A loopback-only multi-node cluster cannot be made on Linux (Ray only keeps
  loopback where ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off, and then refuses to start a second node). So these
  helpers let Ray pick the node address and hand drivers ``127.0.0.1:PORT``.
* Why a driver "could not reach" a ``ray start`` cluster here: not the address. ``ray start --head`` turns token
  authentication on whenever a token exists in ``~/.ray/auth_token`` (any earlier local ``ray.init()`` writes one),
  but ``ray.init(address=...)`` with an explicit address never turns it on, so the driver is refused
  (``AuthenticationError: InvalidAuthToken``), reported as ``ConnectionError: Failed to connect to Ray cluster at
  <host-ip>:PORT`` (the host address being the rewritten one). Setting ``RAY_AUTH_MODE`` explicitly on the nodes and
  the driver fixes it; these helpers use ``RAY_AUTH_MODE=token`` with a fresh token file of their own
  (``RAY_AUTH_TOKEN_PATH``), never ``~/.ray``.
* ``--include-dashboard=false`` still starts a minimal dashboard process (on port 8265 unless told otherwise), and
  each node starts an agent (port 52365 unless told otherwise): both get free ports here.
"""

from __future__ import annotations

import base64
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
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
# JVM options for Spark's daemons, drivers and executors: these JVMs start a third faster on a small, shared
# machine with only the C1 compiler and one GC thread.
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start(cmd: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so its whole process group can be killed), output to ``log``."""
    with open(log, "wb") as handle:
        return subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate ``process`` by its pid, wait, then kill it and what is left of its process group."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children it left behind in its group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def processes_under(directory: Path) -> list[int]:
    """Pids of the processes (other than this one) whose command line or working directory is inside
    ``directory``: what a cluster started there may have left running."""
    mark = str(directory)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if mark in cmdline or cwd == mark or cwd.startswith(mark + os.sep):
            found.append(int(proc.name))
    return found


def kill_leftovers(directory: Path) -> list[int]:
    """Terminate, then kill, every process still running from ``directory``; returns their pids (with a warning:
    stopping the cluster's own processes should have ended them)."""
    pids = processes_under(directory)
    if pids:
        warnings.warn(f"processes left running from {directory} after the cluster stopped, killed: {pids}",
                      stacklevel=2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.1)
    return pids


def wait_for(check: Callable[[], bool], *, what: str, timeout: float, alive: Sequence[subprocess.Popen] = (),
             logs: Sequence[Path] = ()) -> None:
    """Poll ``check`` until true; fail with the logs' tails if it times out or a process in ``alive`` exits."""
    deadline = time.monotonic() + timeout
    while not check():
        dead = [p for p in alive if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            reason = f"exited with {dead[0].returncode}" if dead else f"not within {timeout:.0f} s"
            details = "\n".join(f"--- {log}\n{tail(log)}" for log in logs)
            raise RuntimeError(f"{what}: {reason}\n{details}")
        time.sleep(0.5)


def run_logged(cmd: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path,
               timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion with its output in ``log``; on timeout its whole process group is killed."""
    process = start(cmd, env=env, log=log, cwd=cwd)
    try:
        process.wait(timeout=timeout)
    finally:
        stop(process, timeout=10)
    return subprocess.CompletedProcess([str(c) for c in cmd], process.returncode, tail(log, 20000), "")


def package_zip(package: Path, dest: Path) -> Path:
    """The package directory as a zip for ``spark-submit --py-files`` (no ``__pycache__``)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, path.relative_to(package.parent).as_posix())
    return dest


# --- Spark standalone ---


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


@dataclass
class SparkCluster:
    master: str  # spark://127.0.0.1:PORT
    work_dirs: list[Path]  # one per worker
    cores: int  # per worker
    env: dict[str, str]  # the environment drivers use: SPARK_HOME, PYSPARK_PYTHON, SPARK_LOCAL_IP
    base: Path

    def driver_env(self, run_dir: Path) -> tuple[dict[str, str], Path]:
        """An environment for one driver run whose ``SPARK_CONF_DIR`` enables a plain event log in
        ``run_dir/events``, and waits for every executor before running tasks (so every worker can get some)."""
        conf, events = run_dir / "conf", run_dir / "events"
        conf.mkdir(parents=True)
        events.mkdir()
        settings = {
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": events.as_uri(),
            "spark.eventLog.compress": "false",
            "spark.eventLog.rolling.enabled": "false",
            "spark.executor.memory": "512m",
            "spark.cores.max": str(len(self.work_dirs) * self.cores),
            "spark.scheduler.minRegisteredResourcesRatio": "1.0",
            "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s",
            "spark.driver.extraJavaOptions": JVM_OPTIONS,
            "spark.executor.extraJavaOptions": JVM_OPTIONS,
        }
        (conf / "spark-defaults.conf").write_text("".join(f"{k} {v}\n" for k, v in settings.items()))
        return dict(self.env, SPARK_CONF_DIR=str(conf)), events

    def executors(self, app_id: str) -> list[set[str]]:
        """Per worker, the ids of the executors it launched for ``app_id``."""
        return [{d.name for d in (w / app_id).iterdir() if d.is_dir()} if (w / app_id).is_dir() else set()
                for w in self.work_dirs]


def spark_task_executors(events: Path) -> dict[str, set[str]]:
    """From a directory of Spark event logs: per application id, the executors that finished a task successfully."""
    apps: dict[str, set[str]] = {}
    for log in sorted(events.iterdir()):
        if log.name.startswith(".") or log.name.endswith(".inprogress"):
            continue
        app, ran = None, set()
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event["Event"] == "SparkListenerApplicationStart":
                app = event["App ID"]
            elif event["Event"] == "SparkListenerTaskEnd" and event["Task End Reason"]["Reason"] == "Success":
                ran.add(event["Task Info"]["Executor ID"])
        apps[app or log.name] = ran
    return apps


@contextmanager
def spark_standalone(base: Path, *, workers: int = 2, cores: int = 1, memory: str = "1g",
                     timeout: float = 300) -> Iterator[SparkCluster]:
    """A Spark standalone master and ``workers`` workers on 127.0.0.1 from the installed pyspark, each a
    ``spark-class`` subprocess (the JVM itself: spark-class execs it); stopped by pid on exit."""
    home = spark_home()
    base.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_DIRS=str(base / "local"),
               SPARK_DAEMON_MEMORY="512m", SPARK_DAEMON_JAVA_OPTS=JVM_OPTIONS)
    env.pop("SPARK_CONF_DIR", None)
    daemon_env = dict(env, SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")
    spark_class = home / "bin" / "spark-class"
    port, ui = free_port(), free_port()
    master_url = f"spark://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []
    logs = [base / "master.log"]
    try:
        processes.append(start([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                "--port", port, "--webui-port", ui], env=daemon_env, log=logs[0], cwd=base))
        work_dirs = []
        for i in range(workers):
            work = base / f"worker-{i}"
            work.mkdir()
            work_dirs.append(work)
            logs.append(base / f"worker-{i}.log")
            processes.append(start([spark_class, "org.apache.spark.deploy.worker.Worker", master_url,
                                    "--host", "127.0.0.1", "--cores", cores, "--memory", memory,
                                    "--webui-port", free_port(), "--work-dir", work],
                                   env=daemon_env, log=logs[-1], cwd=base))

        def all_alive() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as reply:
                    return json.load(reply).get("aliveworkers", 0) >= workers
            except (OSError, ValueError):
                return False

        wait_for(all_alive, what=f"Spark master {master_url} with {workers} workers", timeout=timeout,
                 alive=processes, logs=logs)
        yield SparkCluster(master_url, work_dirs, cores, env, base)
    finally:
        for process in reversed(processes):  # workers (and their executors) first, then the master
            stop(process)
        kill_leftovers(base)


# --- Ray ---


@dataclass
class RayCluster:
    address: str  # 127.0.0.1:PORT, what a driver is given
    temp_dir: Path
    env: dict[str, str]  # the environment a driver needs: auth token, export events
    node_ids: set[str] = field(default_factory=set)

    def export_events(self, source: str) -> list[dict]:
        """The ``event_data`` of every export event of type ``source`` (EXPORT_TASK, EXPORT_NODE) so far."""
        events = []
        for log in sorted(self.temp_dir.glob(f"session_*/logs/export_events/event_{source}*.log")):
            for line in log.read_text(errors="replace").splitlines():
                try:
                    events.append(json.loads(line)["event_data"])
                except (ValueError, KeyError):
                    pass  # a line still being written
        return events

    def alive_nodes(self) -> set[str]:
        state: dict[str, str] = {}
        for event in self.export_events("EXPORT_NODE"):
            state[event["node_id"]] = event.get("state", "")
        return {node for node, s in state.items() if s == "ALIVE"}

    def task_nodes(self, function: str) -> dict[str, set[str]]:
        """Per job id (hex), the nodes on which a task of ``function`` finished."""
        FINISHED = "11"  # ray.core.generated.common_pb2.TaskStatus.FINISHED
        tasks: dict[tuple[str, str, int], dict] = {}
        for event in self.export_events("EXPORT_TASK"):
            key = (event.get("job_id", ""), event.get("task_id", ""), event.get("attempt_number", 0))
            task = tasks.setdefault(key, {"name": None, "node": None, "finished": False})
            task["name"] = event.get("task_info", {}).get("func_or_class_name") or task["name"]
            updates = event.get("state_updates", {})
            task["node"] = updates.get("node_id") or task["node"]
            task["finished"] |= FINISHED in updates.get("state_ts_ns", {})
        jobs: dict[str, set[str]] = {}
        for (job, _, _), task in tasks.items():
            if task["name"] == function and task["finished"] and task["node"]:
                jobs.setdefault(base64.b64decode(job).hex(), set()).add(task["node"])
        return jobs


@contextmanager
def ray_nodes(log_dir: Path, *, nodes: int = 2, cpus: int = 1, timeout: float = 300) -> Iterator[RayCluster]:
    """A Ray head and ``nodes - 1`` more nodes on this machine, each ``ray start --block`` (the venv's ``ray``) in a
    subprocess whose pid is ours; stopped by pid on exit (other nodes first, then the head).

    Ray's temp dir is a short new directory under /tmp (its unix sockets' paths must stay under 108 bytes), removed
    after; the ``ray start`` outputs go to ``log_dir``."""
    temp_dir = Path(tempfile.mkdtemp(prefix="p3ray-", dir="/tmp"))
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    exports = "EXPORT_TASK,EXPORT_NODE"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_enable_export_api_write_config=exports)
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    node_args = ["--block", f"--num-cpus={cpus}", "--object-store-memory=100000000", "--disable-usage-stats"]
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    cluster = RayCluster(f"127.0.0.1:{port}", temp_dir, env)
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, temp_dir, ignore_errors=True)
        cleanup.callback(kill_leftovers, temp_dir)
        cleanup.callback(lambda: [stop(p, timeout=40) for p in reversed(processes)])  # drains up to 30 s
        for i in range(nodes):
            logs.append(log_dir / f"ray-node-{i}.log")
            role = ["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                    f"--dashboard-port={free_port()}"] if i == 0 else [f"--address={cluster.address}"]
            # Ray's workers run in their raylet's working directory (not the driver's): a directory of its own per
            # node, so that a path relative to the driver's working directory cannot resolve there by chance.
            cwd = temp_dir / f"node-{i}"
            cwd.mkdir()
            processes.append(start([BIN / "ray", "start", *role, *node_args,
                                    f"--dashboard-agent-listen-port={free_port()}"], env=env, log=logs[-1], cwd=cwd))
            wait_for(lambda n=i + 1: len(cluster.alive_nodes()) >= n, what=f"Ray node {i} joining {cluster.address}",
                     timeout=timeout, alive=processes, logs=logs)
        cluster.node_ids = cluster.alive_nodes()
        yield cluster
