"""The sandbox: it refuses without an opt-in, contains hostile programs (network, fork and memory bombs, big files,
endless loops, private files, writes outside, killing its parent, leftover processes) while the host and the other
programs carry on, and runs hand-written programs with exact results."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from phi3data.cli import app
from phi3data.cli.errors import USER_ERROR_EXIT
from phi3data.generators.sandbox import CodeExecutionRefused, Sandbox

NORMAL = "print(sum(range(10)))"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(allow_code_execution=True, workers=2, timeout=3, memory_mb=512) as box:
        box.baseline = _processes(box)
        box.launchers = sorted(box.worker_pids())
        yield box


@pytest.fixture
def contained(sandbox):
    """The sandbox, for tests that need its namespaces (this machine allows them when it runs as root)."""
    if not (sandbox.isolation["net"] and sandbox.isolation["pid"]):
        pytest.skip(f"this machine allows no namespaces: {sandbox.isolation}")
    yield sandbox
    _assert_unaffected(sandbox)


def _processes(sandbox: Sandbox) -> int:
    """Processes on this machine that belong to the sandbox (its id is in every worker's command line, and every
    program's process is a fork of a worker)."""
    return _processes_with(sandbox.id.encode())


def _processes_with(token: bytes) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += token in Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
    return count


def _assert_unaffected(sandbox: Sandbox) -> None:
    """The same workers are alive, nothing a program started is, and other programs run normally."""
    assert sorted(sandbox.worker_pids()) == sandbox.launchers
    assert _processes(sandbox) == sandbox.baseline
    results = dict(sandbox.run_many([NORMAL, NORMAL]))
    assert [results[i].stdout for i in range(2)] == ["45\n", "45\n"]


def _run(sandbox: Sandbox, source: str, **kwargs):
    return sandbox.run(textwrap.dedent(source), **kwargs)


# ---- opt-in


def test_refuses_without_the_opt_in(tmp_path):
    with pytest.raises(CodeExecutionRefused, match="--allow-code-execution"):
        Sandbox()
    program = tmp_path / "p.py"
    program.write_text(NORMAL)
    refused = CliRunner().invoke(app, ["sandbox", "run", str(program)])
    assert refused.exit_code == USER_ERROR_EXIT
    assert refused.stderr.startswith("error: refusing to run generated code") and "Traceback" not in refused.output


def test_the_command_prints_the_result_as_json(tmp_path):
    program = tmp_path / "p.py"
    program.write_text("import sys\nprint(input().upper())\nprint('oops', file=sys.stderr)\nraise SystemExit(3)\n")
    (tmp_path / "in.txt").write_text("hello\n")
    ran = CliRunner().invoke(app, ["sandbox", "run", str(program), "--timeout", "5", "--stdin",
                                   str(tmp_path / "in.txt"), "--allow-code-execution"])
    assert ran.exit_code == 0, ran.output
    result = json.loads(ran.stdout)
    assert (result["status"], result["exit_code"], result["stdout"], result["stderr"]) == ("error", 3, "HELLO\n",
                                                                                           "oops\n")
    assert result["isolation"]["rlimits"]["cpu_s"] == 5 and result["isolation"]["level"]


def test_each_result_records_its_isolation(sandbox):
    result = sandbox.run(NORMAL)
    isolation = result.isolation
    assert result.ok and isolation["level"] and isolation["rlimits"]["address_space_mb"] == 512
    assert isolation["no_new_privs"] and isolation["capabilities"] == "none"
    if os.geteuid() == 0 and sandbox.found["namespaces"]:
        assert isolation["mode"] == "unshare" and isolation["net"] and isolation["pid"] and isolation["mount"]
        assert isolation["level"] == "namespaces, unprivileged uid" and isolation["user"].startswith("uid ")


# ---- containment, each in its own test; after each the host and the other programs are unaffected


def test_no_connection_to_the_hosts_loopback(contained):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = _run(contained, f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                print("connected")
            except OSError as exc:
                print("blocked", exc.errno)
            """)
        assert result.ok and result.stdout.startswith("blocked"), result
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_no_connection_outside(contained):
    result = _run(contained, """
        import socket
        for address in [("1.1.1.1", 53), ("8.8.8.8", 443), ("example.com", 80)]:
            try:
                socket.create_connection(address, timeout=2).close()
                print("connected", address)
            except OSError as exc:
                print("blocked", address, type(exc).__name__)
        """)
    assert result.ok and result.stdout.count("blocked") == 3 and "connected" not in result.stdout, result


def test_fork_bomb(contained):
    bomb = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    results = dict(contained.run_many([textwrap.dedent(bomb), NORMAL], timeout=1.5))
    assert results[0].status == "timeout", results[0]
    assert results[1].ok and results[1].stdout == "45\n"


def test_memory_bomb(contained):
    bomb = """
        chunks = []
        while True:
            chunks.append(bytearray(64 << 20))
        """
    results = dict(contained.run_many([textwrap.dedent(bomb), NORMAL]))
    assert results[0].status == "oom" and results[0].exception == "MemoryError", results[0]
    assert results[1].ok and results[1].stdout == "45\n"


def test_one_gigabyte_file(contained):
    result = _run(contained, """
        block = b"x" * (1 << 20)
        with open("big.bin", "wb") as handle:
            for _ in range(1024):
                handle.write(block)
        """)
    assert result.status == "error" and "File too large" in result.error, result
    assert result.isolation["rlimits"]["file_size_mb"] == 16


def test_endless_loop(contained):
    result = _run(contained, "while True:\n    pass\n", timeout=1.5)
    assert result.status == "timeout" and result.cpu_seconds is not None, result


def test_a_private_file_outside_its_directory(contained, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("not root: programs keep the caller's uid, which may read the caller's file")
    token = secrets.token_hex(8)
    folder = Path(tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    try:
        folder.chmod(0o755)  # the folder is open: only the file's own mode (0600, ours) guards it
        secret = folder / "secret.txt"
        secret.write_text(token)
        secret.chmod(0o600)
        visible = tmp_path / "visible.txt"  # world-readable, but in the host's /tmp
        visible.write_text(token)
        visible.chmod(0o644)
        result = _run(contained, f"""
            for path in [{str(secret)!r}, {str(visible)!r}]:
                try:
                    print("read", open(path).read())
                except OSError as exc:
                    print("refused", type(exc).__name__)
            """)
        assert result.ok and result.stdout == "refused PermissionError\nrefused FileNotFoundError\n", result
        assert token not in result.stdout + result.stderr
    finally:
        shutil.rmtree(folder)


def test_writing_outside_its_directory(contained, tmp_path):
    token = secrets.token_hex(8)
    targets = [ROOT / f"escape-{token}", Path(f"/var/tmp/escape-{token}"), tmp_path / "escape",
               Path(f"/etc/escape-{token}"), Path(f"/escape-{token}")]
    result = _run(contained, f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                with open(path, "w") as handle:
                    handle.write("x")
                print("wrote", path)
            except OSError as exc:
                print("refused", type(exc).__name__)
        with open("/tmp/escape-{token}", "w") as handle:  # its own private /tmp
            handle.write("x")
        """)
    assert result.ok and result.stdout.count("refused") == len(targets) and "wrote" not in result.stdout, result
    assert not any(t.exists() for t in targets) and not Path(f"/tmp/escape-{token}").exists()
    after = _run(contained, f"import os\nprint(os.path.exists('/tmp/escape-{token}'), sorted(os.listdir('.')))")
    assert after.stdout == "False ['program.py']\n"


def test_killing_its_parent(contained):
    result = _run(contained, """
        import os, subprocess
        for pid in (os.getppid(), 1):
            try:
                os.kill(pid, 9)
            except OSError as exc:
                print("kill", pid, type(exc).__name__)
        try:
            os.kill(-1, 9)
        except OSError as exc:
            print("kill -1", type(exc).__name__)
        print("alive", flush=True)
        subprocess.run(["kill", "-9", "-1"])  # kills everything it may: the program itself
        print("not reached")
        """)
    assert result.status == "killed" and result.signal == "SIGKILL", result
    assert "alive" in result.stdout and "not reached" not in result.stdout


def test_leftover_processes_are_gone(contained):
    token = f"{secrets.randbelow(10 ** 6) + 10 ** 6}.{secrets.randbelow(10 ** 6)}"
    result = _run(contained, f"""
        import os, subprocess, time
        subprocess.Popen(["sleep", "{token}"])  # a child left running
        if os.fork() == 0:  # a daemon: its own session, its parent gone
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{token}"])
            os._exit(0)
        def sleepers():
            found = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    found += "{token}" in open(f"/proc/{{pid}}/cmdline").read()
                except OSError:
                    pass
            return found
        while sleepers() < 2:
            time.sleep(0.01)
        print("both running")
        """)
    assert result.ok and result.stdout == "both running\n", result
    assert _processes_with(token.encode()) == 0


# ---- exact results on hand-written programs


PROGRAMS = {
    "correct": ("def solution():\n    return sum(range(10))\nprint(solution())\n", "45"),
    "wrong": ("def solution():\n    return sum(range(9))\nprint(solution())\n", "45"),
    "raising": ("def solution():\n    return {}['missing']\nprint(solution())\n", "45"),
    "timing out": ("import time\ntime.sleep(60)\nprint(45)\n", "45"),
    "syntax error": ("def solution(:\n    return 45\n", "45"),
    "exit code": ("import sys\nprint(45)\nsys.exit(3)\n", "45"),
}


def _verdict(result, expected: str) -> str:
    if result.ok:
        return "correct" if result.stdout.strip() == expected else "wrong"
    return result.status


def test_hand_written_programs_have_exact_results(sandbox):
    names = list(PROGRAMS)
    results = dict(sandbox.run_many([PROGRAMS[n][0] for n in names], timeout=1.5))
    verdicts = {n: _verdict(results[i], PROGRAMS[n][1]) for i, n in enumerate(names)}
    assert verdicts == {"correct": "correct", "wrong": "wrong", "raising": "error", "timing out": "timeout",
                        "syntax error": "error", "exit code": "error"}
    by_name = {n: results[i] for i, n in enumerate(names)}
    assert by_name["correct"].to_dict()["stdout"] == "45\n" and by_name["correct"].exit_code == 0
    assert by_name["wrong"].stdout == "36\n"
    raising = by_name["raising"]
    assert (raising.exception, raising.exit_code, raising.error) == ("KeyError", 1, "KeyError: 'missing'")
    assert 'File "/tmp/program.py", line 2, in solution' in raising.stderr and "sandbox.py" not in raising.stderr
    assert by_name["syntax error"].exception == "SyntaxError"
    assert (by_name["exit code"].exit_code, by_name["exit code"].stdout) == (3, "45\n")
    assert by_name["timing out"].stdout == "" and by_name["timing out"].error == "wall-clock limit of 1.5s"


def test_non_deterministic_programs_differ_between_runs(sandbox):
    source = "import os, random\nprint(random.random(), os.urandom(8).hex())\n"
    first, second = sandbox.run(source), sandbox.run(source)
    assert first.ok and second.ok and first.stdout != second.stdout
    a, b = (dict(sandbox.run_many([source] * 4)) for _ in range(2))
    assert len({r.stdout for r in [*a.values(), *b.values()]}) == 8


def test_stdin_and_a_fresh_main(sandbox):
    result = sandbox.run("import sys, __main__\nprint(input()[::-1], __name__, __main__.__file__, sys.argv)\n"
                         "def f():\n    pass\nimport pickle\nprint(pickle.loads(pickle.dumps(f)) is f)\n",
                         stdin="abc\n")
    assert result.stdout == "cba __main__ /tmp/program.py ['/tmp/program.py']\nTrue\n", result


def test_the_fallback_without_namespaces_says_so():
    with Sandbox(allow_code_execution=True, workers=1, timeout=1.5, tool="none") as box:
        ok, stuck = box.run(NORMAL), box.run("while True:\n    pass\n")
    assert ok.stdout == "45\n" and stuck.status == "timeout"
    assert ok.isolation["mode"] == "none" and not ok.isolation["net"] and not ok.isolation["pid"]
    assert ok.isolation["level"].startswith("rlimits")
