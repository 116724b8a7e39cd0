"""A sandbox for generated Python programs: each runs in a fresh private directory, without network, in its own
PID namespace, with resource limits and dropped privileges, and is killed whole when it runs too long.

    from phi3data.generators.sandbox import Sandbox

    with Sandbox(allow_code_execution=True, workers=2, timeout=5) as sandbox:
        result = sandbox.run("print(6 * 7)")             # result.status == "ok", result.stdout == "42\\n"
        for index, result in sandbox.run_many(sources):  # in completion order, over all workers
            ...

Generated code runs only with an explicit opt-in (``allow_code_execution=True``; ``--allow-code-execution`` on the
command line; ``allow_code_execution = true`` in a plan): otherwise :class:`CodeExecutionRefused`.

How (the ``unshare`` mode, when the machine allows namespaces): each worker is a long-lived Python process started
once under ``unshare --net --pid --mount --ipc --uts`` (as root, or in a user namespace). It has
no network (a network namespace with only a loopback that is down), sees every mount read-only, and is PID 1 of
its own PID namespace: when it dies, everything under it dies. It is a fork server. For each program it forks an
*init* as PID 1 of a fresh PID namespace, which mounts a private tmpfs on ``/tmp`` (the program's working
directory), another on ``/dev/shm`` and a fresh ``/proc``, then forks the program. The program's process sets its
rlimits (CPU seconds, address space, processes, file size, open files, no core files), drops every capability,
sets no_new_privs, takes an unprivileged uid (as root: an unused uid per worker, like ``nobody`` but not shared,
so programs cannot signal each other or share a process limit), gets a clean environment and runs the source with
``exec`` in a fresh ``__main__``: no interpreter start per program. When the program exits the init
reports and exits, and the kernel kills whatever the program left behind (daemons included); on the wall-clock
limit the worker kills the init, with the same effect. A worker that dies is replaced.

Without namespaces (``none`` mode, said in every result's ``isolation``): the program is forked straight from the
worker into its own session and a fresh temporary directory, with the same rlimits and privilege drop; at the
end every process of the worker's uid is killed. The network and the rest of the filesystem are not contained.

``python sandbox.py --worker CONFIG`` is the worker; it imports only the standard library.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import resource
import select
import signal
import sys
import time

UID_RANGE = (1 << 24, 1 << 31)
"""Where the per-worker uids are drawn from (far above any account)."""
DEFAULT_PRELOAD = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "operator",
                   "re", "string", "statistics", "random", "heapq", "bisect", "datetime", "json", "typing",
                   "dataclasses", "traceback")
"""Modules the workers import once, so programs do not pay for them: pure computation, no I/O or privileges."""

STATUSES = ("ok", "error", "timeout", "oom", "killed")
"""``ok``: exit code 0. ``error``: a non-zero exit (an exception, a syntax error, ``sys.exit(n)``). ``timeout``:
past the wall-clock or CPU limit. ``oom``: MemoryError (the address-space limit). ``killed``: ended by a signal
(its own doing, or a limit), or the sandbox itself failed (``error`` says which)."""


class CodeExecutionRefused(ValueError):
    """Generated code would run, but the user has not opted in."""

    def __init__(self, what: str = "running generated code") -> None:
        super().__init__(f"refusing to run generated code ({what}): it executes untrusted programs on this machine. "
                         "Opt in with --allow-code-execution on the command line, allow_code_execution = true in "
                         "the plan, or Sandbox(allow_code_execution=True)")


class SandboxError(RuntimeError):
    """The sandbox could not start its workers."""


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------

class SandboxResult:
    """One program's run: ``status`` (see :data:`STATUSES`), ``exit_code`` (-N for signal N), ``stdout`` and
    ``stderr`` (their tails), ``exception`` (class name, for an error), ``error`` (one line: the exception or why it
    was stopped), ``cpu_seconds``, ``max_rss_mb``, ``wall_seconds``, and ``isolation``. Reads as a mapping too
    (``result["status"]``, ``result.get("stdout")``), as provenance rows do; :meth:`to_dict` is JSON-ready."""

    FIELDS = ("status", "exit_code", "signal", "stdout", "stderr", "stdout_bytes", "stderr_bytes", "exception",
              "error", "cpu_seconds", "max_rss_mb", "wall_seconds", "isolation")
    __slots__ = FIELDS

    def __init__(self, **values: object) -> None:
        for name in self.FIELDS:
            setattr(self, name, values.get(name))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def get(self, key: str, default: object = None) -> object:
        return getattr(self, key, default) if key in self.FIELDS else default

    def __getitem__(self, key: str) -> object:
        if key not in self.FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __repr__(self) -> str:
        return (f"SandboxResult(status={self.status!r}, exit_code={self.exit_code!r}, error={self.error!r}, "
                f"stdout={(self.stdout or '')[-60:]!r})")


# --------------------------------------------------------------------------------------------------------------
# Host side: what the machine allows, and the pool of workers
# --------------------------------------------------------------------------------------------------------------

_PROBE: dict | None = None
_NAMESPACE_FLAGS = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork"]


def probe() -> dict:
    """What this machine allows: the tools on PATH, whether we are root, and whether ``unshare`` can create the
    namespaces (as root, or in a user namespace). Cached for the process."""
    global _PROBE
    if _PROBE is None:
        import shutil
        import subprocess

        tools = {name: shutil.which(name) for name in ("unshare", "setpriv", "prlimit", "bwrap")}
        root = os.geteuid() == 0

        def works(argv: list[str]) -> bool:
            try:
                return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, timeout=20).returncode == 0
            except (OSError, subprocess.SubprocessError):
                return False

        unshare = tools["unshare"]
        namespaces = bool(unshare) and root and works([unshare, *_NAMESPACE_FLAGS, "true"])
        user_ns = bool(unshare) and not namespaces and works([unshare, "--user", "--map-root-user",
                                                               *_NAMESPACE_FLAGS, "true"])
        _PROBE = {"root": root, "tools": tools, "namespaces": namespaces, "user_namespaces": user_ns}
    return _PROBE


def _choose_mode(tool: str, found: dict) -> tuple[str, str | None]:
    """(mode, why it fell back or None): ``unshare`` (root), ``unshare-user`` (user namespace) or ``none``."""
    available = {"unshare": found["namespaces"], "unshare-user": found["user_namespaces"], "none": True}
    if tool != "auto":
        if tool not in available:
            raise ValueError(f"sandbox tool must be auto, unshare, unshare-user or none, not {tool!r}")
        if not available[tool]:
            raise ValueError(f"sandbox tool {tool!r} is not available on this machine: {found}")
        return tool, None
    for mode in ("unshare", "unshare-user"):
        if available[mode]:
            return mode, None
    why = ("no unshare on PATH" if not found["tools"]["unshare"] else
           "unshare cannot create namespaces here (not root, and user namespaces are off)")
    return "none", f"{why}: programs share the network and the filesystem"


class _Worker:
    """One fork-server process and the pipes to it."""

    def __init__(self, argv: list[str], env: dict[str, str], start_timeout: float, uid: int | None = None) -> None:
        import subprocess
        import tempfile

        self.log = tempfile.TemporaryFile()
        as_user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     cwd="/", start_new_session=True, close_fds=True, bufsize=0, **as_user)
        self._buffer = b""
        hello = self._read_line(time.monotonic() + start_timeout)
        if hello is None or not hello.get("ready"):
            why = (hello or {}).get("error") or self.log_tail() or "no reply"
            self.kill()
            raise SandboxError(f"sandbox worker did not start: {why}")
        self.isolation: dict = hello["isolation"]

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode("utf-8", "replace").strip()

    def _read_line(self, deadline: float) -> dict | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def request(self, message: dict, deadline: float) -> dict | None:
        """The worker's reply, or None when it died or stopped answering."""
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            return self._read_line(deadline)
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """End the worker and everything under it (its process group; the namespaces die with it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.log.close()

    def close(self, grace: float = 2.0) -> None:
        """Ask the worker to exit (end of its input), then kill what is left."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=grace)
        except Exception:  # noqa: BLE001 - any failure to stop politely ends in kill()
            pass
        self.kill()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in list(workers):
        worker.close()
    workers.clear()


class Sandbox:
    """A pool of isolated fork-server workers that run Python programs (see the module docstring).

    ``timeout`` is the wall-clock limit per program (seconds; the CPU limit is the same, rounded up); ``memory_mb``
    the address-space limit; ``processes`` the most processes/threads of the sandbox user; ``file_size_mb`` the
    largest file a program may write (its output included); ``open_files`` the most file descriptors; ``tmp_mb``
    the size of its private ``/tmp``; ``output_bytes`` how much of the end of stdout/stderr a result keeps.
    ``tool`` is ``auto`` (the strongest the machine allows), ``unshare``, ``unshare-user`` or ``none``."""

    def __init__(self, *, allow_code_execution: bool = False, workers: int | None = None, timeout: float = 10.0,
                 memory_mb: int = 1024, processes: int = 64, file_size_mb: int = 16, open_files: int = 256,
                 tmp_mb: int = 64, output_bytes: int = 8192, tool: str = "auto", python: str | None = None,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD, start_timeout: float = 60.0) -> None:
        if not allow_code_execution:
            raise CodeExecutionRefused()
        if timeout <= 0:
            raise ValueError(f"sandbox timeout must be positive, not {timeout}")
        self.size = workers or len(os.sched_getaffinity(0))
        self.timeout = float(timeout)
        self.limits = {"memory_mb": int(memory_mb), "processes": int(processes), "file_size_mb": int(file_size_mb),
                       "open_files": int(open_files), "tmp_mb": int(tmp_mb), "output_bytes": int(output_bytes)}
        self.found = probe()
        self.tool = tool
        self.mode, self.fallback = _choose_mode(tool, self.found)
        self.python = python or sys.executable
        self.preload = tuple(preload)
        self.start_timeout = start_timeout
        self.id = os.urandom(6).hex()
        """In every worker's command line, to find this sandbox's processes."""
        self._workers: list[_Worker] = []
        self._idle = None
        self._lock = None
        self._finalizer = None
        self.isolation: dict | None = None

    # ---- lifecycle
    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers (in parallel); :meth:`run` does it on first use."""
        import queue
        import threading
        import weakref
        from concurrent.futures import ThreadPoolExecutor

        if self._idle is not None:
            return
        self._lock = threading.Lock()
        self._idle = queue.Queue()
        with ThreadPoolExecutor(self.size) as pool:
            futures = [pool.submit(self._spawn) for _ in range(self.size)]
            errors = []
            for future in futures:
                try:
                    worker = future.result()
                except SandboxError as exc:
                    errors.append(exc)
                    continue
                self._workers.append(worker)
                self._idle.put(worker)
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        if errors:
            self.close()
            weaker = {"unshare": "unshare-user", "unshare-user": "none"}.get(self.mode)
            if self.tool != "auto" or weaker is None:
                raise errors[0]
            if weaker == "unshare-user" and not self.found["user_namespaces"]:
                weaker = "none"
            # the probe saw namespaces, but a worker could not set itself up in them (a container that forbids
            # mounts, say): the next weaker mode, which every result then names
            self.mode, self.fallback = weaker, f"the {self.mode} mode failed here ({errors[0]})"
            return self.start()
        self.isolation = dict(self._workers[0].isolation)

    def close(self) -> None:
        """Stop every worker (and whatever runs under it)."""
        if self._finalizer is not None:
            self._finalizer()
        self._idle = None

    def _spawn(self) -> _Worker:
        uid = _unused_uid() if self.mode == "unshare" or os.geteuid() == 0 else None
        # a user namespace maps only the uid it was made by: root makes it as the unprivileged uid, whose
        # programs keep it (as root of their namespace); elsewhere the worker itself drops to ``uid``
        launch_as = uid if self.mode == "unshare-user" else None
        config = {"mode": self.mode, "fallback": self.fallback, "preload": self.preload,
                  "uid": None if launch_as is not None else uid, "sandbox": self.id}
        argv = [self.python, "-I", os.path.abspath(__file__), "--worker", json.dumps(config)]
        if self.mode == "unshare":
            argv = [self.found["tools"]["unshare"], *_NAMESPACE_FLAGS, "--kill-child", "--mount-proc", *argv]
        elif self.mode == "unshare-user":
            argv = [self.found["tools"]["unshare"], "--user", "--map-root-user", *_NAMESPACE_FLAGS, "--kill-child",
                    "--mount-proc", *argv]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        return _Worker(argv, env, self.start_timeout, launch_as)

    def worker_pids(self) -> list[int]:
        """The process ids of the workers' launchers (each worker's namespace hangs under one)."""
        return [worker.proc.pid for worker in self._workers]

    # ---- running
    def run(self, source: str, *, stdin: str | bytes | None = None, timeout: float | None = None,
            filename: str = "program.py") -> SandboxResult:
        """Run one program and return its result; thread-safe (runs go to idle workers, or wait for one)."""
        if self._idle is None:
            self.start()
        timeout = self.timeout if timeout is None else float(timeout)
        if isinstance(stdin, str):
            stdin = stdin.encode()
        message = {"source": source, "filename": os.path.basename(filename) or "program.py", "timeout": timeout,
                   "stdin": base64.b64encode(stdin).decode() if stdin else None, **self.limits}
        for _attempt in range(2):  # a worker that died is replaced, and the program runs once more
            worker = self._idle.get()
            reply = worker.request(message, time.monotonic() + timeout + 30)
            if reply is not None:
                self._idle.put(worker)
                return SandboxResult(**{**reply, "isolation": self._isolation(message)})
            why = worker.log_tail()
            self._replace(worker)
        return SandboxResult(status="killed", error=f"the sandbox worker died twice running this program: {why}",
                             isolation=self._isolation(message))

    def run_many(self, sources: list[str], timeout: float | None = None, *,
                 stdins: list[str | bytes | None] | None = None):
        """Run every source over all workers; yields ``(index, result)`` as each finishes."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        if self._idle is None:
            self.start()
        with ThreadPoolExecutor(self.size) as pool:
            futures = {pool.submit(self.run, source, timeout=timeout, stdin=stdins[i] if stdins else None): i
                       for i, source in enumerate(sources)}
            for future in as_completed(futures):
                yield futures[future], future.result()

    def _replace(self, dead: _Worker) -> None:
        dead.kill()
        with self._lock:
            if dead in self._workers:
                self._workers.remove(dead)
        worker = self._spawn()
        with self._lock:
            self._workers.append(worker)
        self._idle.put(worker)

    def _isolation(self, message: dict) -> dict:
        isolation = dict(self.isolation or {})
        isolation["rlimits"] = {"cpu_s": _cpu_limit(message["timeout"]), "address_space_mb": message["memory_mb"],
                                "processes": message["processes"], "file_size_mb": message["file_size_mb"],
                                "open_files": message["open_files"], "core": 0}
        isolation["wall_s"] = message["timeout"]
        return isolation


def _unused_uid() -> int:
    """A uid no account has (programs run as it; it owns nothing outside their private /tmp)."""
    import pwd
    import random

    draw = random.SystemRandom()
    while True:
        uid = draw.randrange(*UID_RANGE)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


def _cpu_limit(timeout: float) -> int:
    return max(1, int(timeout + 0.999))


# --------------------------------------------------------------------------------------------------------------
# Worker side (stdlib only): runs inside the namespaces; one program at a time
# --------------------------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 36, 38
_MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
_libc = None


def _sys(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return _libc


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    _sys(_lib().mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, arg: int = 0) -> None:
    _sys(_lib().prctl(option, arg, 0, 0, 0), f"prctl {option}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_bounding_set(last_cap: int) -> None:
    """No capability can be gained again, even by exec (needs CAP_SETPCAP: before the uid change)."""
    for cap in range(last_cap + 1):
        _sys(_lib().prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def _clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (a mapped root in a user namespace keeps none)."""
    _sys(_lib().capset(ctypes.byref(_CapHeader(0x20080522, 0)), (_CapData * 2)()), "capset")


def _mounts() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, set(fields[5].split(","))))
    return out


def _expose(paths: list[str], uid: int | None) -> list[str]:
    """Make ``paths`` (the interpreter's) reachable for the sandbox user: a directory above them it may not
    enter (``/root`` at 0700, say) is covered by an empty tmpfs into which only the needed entries are bound."""
    if uid is None:
        return []
    exposed = []
    for _ in range(8):
        blockers: dict[str, set[str]] = {}
        for path in paths:
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts)):
                parent = "/" + "/".join(parts[:depth])
                if not os.stat(parent).st_mode & 0o001:
                    blockers.setdefault(parent, set()).add(parts[depth])
                    break
        if not blockers:
            break
        for parent, names in blockers.items():
            handles = {name: os.open(os.path.join(parent, name), os.O_PATH) for name in names}
            _mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
            for name, fd in handles.items():
                target = os.path.join(parent, name)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(target)
                else:
                    open(target, "w").close()
                _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
                os.close(fd)
                exposed.append(target)
    return exposed


def _reachable(path: str) -> bool:
    """Whether any user may enter every directory down to ``path``."""
    parts = [p for p in path.split("/") if p]
    return all(os.stat("/" + "/".join(parts[:depth])).st_mode & 0o001 for depth in range(len(parts) + 1))


def _read_only_everywhere() -> list[str]:
    """Remount every mount read-only and nosuid (keeping the flags a user namespace may not clear); returns the
    mount points that refused."""
    failed = []
    for point, options in _mounts():
        if point == "/proc" or point.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for name in options:
            flags |= _MOUNT_FLAGS.get(name, 0)
        try:
            _mount(None, point, None, flags)
        except OSError:
            failed.append(point)
    return failed


class _ForkServer:
    """The fork server (inside the worker process)."""

    def __init__(self, config: dict, proto_in: int, proto_out: int, devnull: int) -> None:
        self.mode = config["mode"]
        self.namespaced = self.mode != "none"
        self.uid = config["uid"]
        self.proto_in, self.proto_out, self.devnull = proto_in, proto_out, devnull
        self.input = os.fdopen(self.proto_in, "rb", buffering=1 << 16)
        self.last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
        self.clock_ticks = os.sysconf("SC_CLK_TCK")
        for name in config["preload"]:
            __import__(name)
        # our own frames are cut from programs' tracebacks
        self.frame_file = os.path.abspath(__file__)
        if self.mode == "unshare-user":
            host_uid = int(open("/proc/self/uid_map").read().split()[1])
            user = f"uid {host_uid} (root only inside its user namespace)"
        elif self.uid is not None:
            host_uid, user = self.uid, f"uid {self.uid} (no account, this worker's own)"
        else:
            host_uid = os.getuid()
            user = f"uid {host_uid} (the caller's)"
        level = ("namespaces" if self.namespaced else "rlimits") + (", root" if host_uid == 0 else
                                                                    ", unprivileged uid")
        isolation = {"level": level, "mode": self.mode, "tool": "unshare" if self.namespaced else None,
                     "net": self.namespaced, "pid": self.namespaced, "ipc": self.namespaced,
                     "mount": self.namespaced, "user": user, "no_new_privs": True, "capabilities": "none",
                     "clean_env": True, "fallback": config.get("fallback")}
        if self.namespaced:
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            interpreter = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                           os.path.dirname(os.path.realpath(sys.executable))}
            interpreter |= {p for p in sys.path if p and os.path.exists(p)}
            exposed = _expose(sorted(interpreter), self.uid)
            refused = _read_only_everywhere()
            isolation["fs"] = ("read-only except a private /tmp (its working directory) and /dev/shm"
                               if not refused else f"read-only except /tmp, /dev/shm and {refused}")
            if exposed:
                isolation["exposed"] = exposed
            self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        else:
            import tempfile

            if self.uid is not None and not _reachable(sys.base_prefix):
                isolation["imports"] = (f"only the preloaded modules: {sys.base_prefix} is out of the sandbox user's "
                                        "reach, and without a mount namespace it cannot be exposed")
            self.base = tempfile.mkdtemp(prefix="phi3data-sandbox-")
            os.chmod(self.base, 0o711)
            isolation["fs"] = "a fresh directory per program; the rest of the filesystem as the user may reach it"
            isolation["leftovers"] = ("every process of its uid is killed" if self.uid is not None else
                                      "its process group is killed (processes in a session of their own survive)")
            _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, to be reaped after the kill
        self.isolation = {k: v for k, v in isolation.items() if v is not None}
        if self.namespaced or os.geteuid() == 0:
            # once, here: the bounding set only limits what exec could gain, and this process never execs;
            # its own capabilities stay until a program's process changes uid or clears them
            _drop_bounding_set(self.last_cap)
        import gc

        gc.freeze()  # what is loaded now stays out of the collector: forked programs do not copy it page by page
        self.reply({"ready": True, "isolation": self.isolation})

    def reply(self, message: dict) -> None:
        data = json.dumps(message).encode() + b"\n"
        while data:
            data = data[os.write(self.proto_out, data):]

    def serve(self) -> None:
        """Run programs until the host closes our input."""
        for line in self.input:
            try:
                result = self.run(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - the worker reports and keeps serving
                result = {"status": "killed", "error": f"sandbox failure: {type(exc).__name__}: {exc}"}
            self.reply(result)
        if not self.namespaced:
            import shutil

            shutil.rmtree(self.base, ignore_errors=True)

    # ---- one program
    def run(self, request: dict) -> dict:
        stdin = self.devnull
        if request.get("stdin"):
            stdin = os.memfd_create("stdin")
            os.write(stdin, base64.b64decode(request["stdin"]))
            os.lseek(stdin, 0, os.SEEK_SET)
        out, err = os.memfd_create("stdout"), os.memfd_create("stderr")
        report_r, report_w = os.pipe()
        started = time.monotonic()
        try:
            if self.namespaced:
                _sys(_lib().unshare(CLONE_NEWPID), "unshare")
                try:
                    pid = os.fork()
                    if pid == 0:
                        self._init(request, (stdin, out, err), report_w)  # never returns
                finally:  # the next fork is a plain one again, in our own PID namespace
                    _sys(_lib().setns(self.own_pid_ns, CLONE_NEWPID), "setns")
            else:
                workdir = self._fresh_dir()
                pid = os.fork()
                if pid == 0:
                    try:
                        os.close(report_r)
                        self._program(request, (stdin, out, err), workdir)
                    finally:
                        os._exit(120)
            os.close(report_w)
            report_w = -1
            outcome = self._wait(pid, report_r, request["timeout"], started)
            if not self.namespaced:
                self._clean_up(pid, workdir)
            outcome["wall_seconds"] = round(time.monotonic() - started, 4)
            return self._classify(outcome, request, out, err)
        finally:
            for fd in (out, err, report_r, report_w, stdin if stdin != self.devnull else -1):
                if fd >= 0:
                    os.close(fd)

    def _wait(self, pid: int, report_r: int, timeout: float, started: float) -> dict:
        """Wait for the program (namespaced: its init's report) until the wall-clock limit; kill it past that."""
        waiting = report_r if self.namespaced else os.pidfd_open(pid)
        poller = select.poll()
        poller.register(waiting, select.POLLIN)
        poller.register(self.proto_in, 0)  # POLLHUP: the host went away
        timed_out = False
        while True:
            left = started + timeout - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            events = dict(poller.poll(left * 1000))
            if self.proto_in in events:
                os.kill(pid, signal.SIGKILL)
                if not self.namespaced:
                    self._kill_leftovers(pid)
                os._exit(0)
            if waiting in events:
                break
        usage = self._usage_now(pid) if timed_out else {}
        if timed_out:
            os.kill(pid, signal.SIGKILL)  # the init: the kernel kills its whole PID namespace
        if self.namespaced:
            report = b""
            while not timed_out and (chunk := os.read(report_r, 1 << 16)):
                report += chunk
            _, status, _ = os.wait4(pid, 0)
            outcome = json.loads(report) if report else {}
            if not timed_out and not report:
                outcome = {"sandbox_error": f"the program's init ended without a report ({_describe(status)})"}
        else:
            os.close(waiting)
            _, status, rusage = os.wait4(pid, 0)
            outcome = {"status": status, "cpu": rusage.ru_utime + rusage.ru_stime, "rss_kb": rusage.ru_maxrss}
        if timed_out:
            outcome = {**usage, "timed_out": True}
        return outcome

    def _usage_now(self, pid: int) -> dict:
        """CPU and peak memory of a program still running (read before it is killed)."""
        try:
            if self.namespaced:
                pid = int(open(f"/proc/{pid}/task/{pid}/children").read().split()[0])
            stat = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
            hwm = re.search(r"VmHWM:\s+(\d+)", open(f"/proc/{pid}/status").read())
            return {"cpu": (int(stat[11]) + int(stat[12])) / self.clock_ticks,
                    "rss_kb": int(hwm.group(1)) if hwm else None}
        except (OSError, IndexError, ValueError):
            return {}

    def _classify(self, outcome: dict, request: dict, out: int, err: int) -> dict:
        tail = request["output_bytes"]
        stdout, stdout_bytes = _tail(out, tail)
        stderr, stderr_bytes = _tail(err, tail)
        cpu = outcome.get("cpu")
        result = {"stdout": stdout, "stderr": stderr, "stdout_bytes": stdout_bytes, "stderr_bytes": stderr_bytes,
                  "cpu_seconds": None if cpu is None else round(cpu, 4), "wall_seconds": outcome.get("wall_seconds"),
                  "max_rss_mb": None if outcome.get("rss_kb") is None else round(outcome["rss_kb"] / 1024, 1),
                  "exit_code": None, "signal": None, "exception": None, "error": None}
        if outcome.get("sandbox_error"):
            return {**result, "status": "killed", "error": outcome["sandbox_error"]}
        if outcome.get("timed_out"):
            return {**result, "status": "timeout", "error": f"wall-clock limit of {request['timeout']:g}s"}
        status = outcome["status"]
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
            result.update(exit_code=-number, signal=name)
            cpu_limit = _cpu_limit(request["timeout"])
            if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu is not None and cpu >= cpu_limit):
                return {**result, "status": "timeout", "error": f"CPU limit of {cpu_limit}s"}
            why = {signal.SIGXFSZ: "file size limit", signal.SIGKILL: "killed (SIGKILL)"}.get(number, name)
            return {**result, "status": "killed", "error": why}
        code = os.WEXITSTATUS(status)
        result["exit_code"] = code
        if code == 0:
            return {**result, "status": "ok"}
        line, exception = _last_exception(stderr)
        result.update(exception=exception, error=line or f"exit code {code}")
        return {**result, "status": "oom" if exception == "MemoryError" else "error"}

    # ---- namespaced: the init (PID 1 of the program's namespace) and the program
    def _init(self, request: dict, fds: tuple[int, int, int], report_w: int) -> None:
        report = {}
        try:
            _lib().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _sys(_lib().unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
            owner = f",uid={self.uid},gid={self.uid}" if self.uid is not None else ""
            _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={request['tmp_mb']}m,mode=0700{owner}")
            _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={request['tmp_mb']}m,mode=1777")
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            child = os.fork()
            if child == 0:
                try:
                    os.close(report_w)
                    self._program(request, fds, "/tmp")
                finally:
                    os._exit(120)
            while True:  # reap everything the program leaves to us, until the program itself
                pid, status, rusage = os.wait4(-1, 0)
                if pid == child:
                    break
            report = {"status": status, "cpu": rusage.ru_utime + rusage.ru_stime, "rss_kb": rusage.ru_maxrss}
        except BaseException as exc:  # noqa: BLE001 - reported to the worker, never raised into it
            report = {"sandbox_error": f"sandbox init failed: {type(exc).__name__}: {exc}"}
        finally:
            try:
                os.write(report_w, json.dumps(report).encode())
            finally:
                os._exit(0)  # PID 1 exits: the kernel kills whatever is left in the namespace

    def _fresh_dir(self) -> str:
        import tempfile

        workdir = tempfile.mkdtemp(dir=self.base)
        if self.uid is not None:
            os.chown(workdir, self.uid, self.uid)
        return workdir

    def _clean_up(self, pid: int, workdir: str) -> None:
        """Without a PID namespace: kill what the program left, reap it, remove the program's directory."""
        import shutil

        self._kill_leftovers(pid)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        shutil.rmtree(workdir, ignore_errors=True)

    def _kill_leftovers(self, pid: int) -> None:
        """All processes of the program's uid (or, without one, its process group)."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.uid is not None:
            killer = os.fork()
            if killer == 0:
                try:
                    os.setresuid(self.uid, self.uid, self.uid)
                    os.kill(-1, signal.SIGKILL)  # every process of this uid but the caller
                finally:
                    os._exit(0)
            os.waitpid(killer, 0)

    def _program(self, request: dict, fds: tuple[int, int, int], workdir: str) -> None:
        """In the program's own process: limits, privileges, environment, then the program."""
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 1 << 16)
        os.chdir(workdir)
        cpu = _cpu_limit(request["timeout"])
        mb = 1 << 20
        for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                             (resource.RLIMIT_AS, (request["memory_mb"] * mb,) * 2),
                             (resource.RLIMIT_NPROC, (request["processes"],) * 2),
                             (resource.RLIMIT_FSIZE, (request["file_size_mb"] * mb,) * 2),
                             (resource.RLIMIT_NOFILE, (request["open_files"],) * 2),
                             (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(limit, value)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if self.uid is not None:
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)
        _clear_capabilities()
        _prctl(PR_SET_DUMPABLE, 1)  # a normal process again (a uid change made it undumpable)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"})
        _exec_program(request["source"], os.path.join(workdir, request["filename"]), self.frame_file)


def _exec_program(source: str, path: str, own_file: str) -> None:
    """Run ``source`` as ``python path`` would (fresh ``__main__``, argv, std streams, exit code); never returns."""
    import atexit
    import builtins
    import types

    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                                       closefd=False)
    code = 0
    try:
        with open(path, "w", encoding="utf-8") as handle:  # for __file__, tracebacks and inspect
            handle.write(source)
        main = types.ModuleType("__main__")
        main.__file__ = path
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        sys.argv = [path]
        sys.path[0:0] = [os.path.dirname(path)]
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - reported as Python would, on stderr
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == own_file:
            tb = tb.tb_next
        try:
            traceback.print_exception(type(exc), exc, tb)
        except BaseException:  # noqa: BLE001
            pass
        code = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            code = code or 120
    os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    try:
        print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _tail(fd: int, keep: int) -> tuple[str, int]:
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, keep), max(0, size - keep))
    return data.decode("utf-8", "replace"), size


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s.*)?$")


def _last_exception(stderr: str) -> tuple[str | None, str | None]:
    """(line, class name) of the exception a traceback ends with, when it does."""
    for line in reversed(stderr.rstrip().splitlines()[-50:]):
        match = _EXCEPTION_LINE.match(line)
        if match and ("Error" in line or "Exception" in line or ":" in line):
            return line[:300], match.group(1).rpartition(".")[2]
        if line and not line[0].isspace():
            return line[:300], None
    return None, None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _worker_main(argv: list[str]) -> None:
    config = json.loads(argv[argv.index("--worker") + 1])
    # the protocol moves off fds 0 and 1, which point at /dev/null from here on
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    try:
        server = _ForkServer(config, proto_in, proto_out, devnull)
    except Exception as exc:  # noqa: BLE001 - the host shows this
        os.write(proto_out, json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        raise SystemExit(1) from None
    server.serve()


if __name__ == "__main__":
    _worker_main(sys.argv)
