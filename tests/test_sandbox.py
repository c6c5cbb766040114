"""Containment tests for gsil.evaluation.sandbox: hostile programs must fail and stay contained.

Several tests also run the same hostile program *without* the sandbox (a control run) to
prove that the program really does the damage the sandbox is supposed to prevent, and that
the detectors used here (canary files, /proc scan) actually notice it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from gsil.evaluation.sandbox import SandboxLimits, isolation_info, run_untrusted

REPO = Path(__file__).resolve().parents[1]


def procs_with(marker: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            found.append(int(entry))
    return found


def wait_gone(marker: str, timeout: float = 2.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = procs_with(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_isolation_probe_describes_layers() -> None:
    info = isolation_info()
    assert info.mode in ("userns", "namespaces", "none")
    assert "rlimits" in info.describe()
    if sys.platform.startswith("linux") and info.mode == "none":
        assert info.not_enforced, "reduced isolation must list what is not enforced"


def test_simple_program_passes() -> None:
    res = run_untrusted("print('hello from the sandbox')", SandboxLimits(timeout_s=10))
    assert res.status == "passed", res
    assert res.passed and res.returncode == 0
    assert res.stdout_tail == "hello from the sandbox\n"
    assert res.wall_s < 5


def test_exception_is_failure() -> None:
    res = run_untrusted("raise ValueError('boom')", SandboxLimits(timeout_s=10))
    assert res.status == "failed" and not res.passed
    assert res.returncode == 1
    assert "ValueError: boom" in res.stderr_tail


@pytest.mark.parametrize(
    "early",
    [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "raise SystemExit",
        "quit()",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    ],
)
def test_early_exit_is_not_a_pass(early: str) -> None:
    program = early + "\nassert False, 'tests that never ran'\n"
    res = run_untrusted(program, SandboxLimits(timeout_s=10))
    assert not res.passed
    assert res.status in ("early_exit", "failed"), res


def test_exit_code_alone_passes_only_without_nonce() -> None:
    # Control: the same early exit is a "pass" if the completion nonce is not required,
    # which is exactly what the nonce protects against.
    res = run_untrusted(
        "import os\nos._exit(0)", SandboxLimits(timeout_s=10), require_completion=False
    )
    assert res.status == "passed"
    assert (
        run_untrusted("import os\nos._exit(0)", SandboxLimits(timeout_s=10)).status == "early_exit"
    )


def test_program_source_not_on_disk() -> None:
    program = "import os\nprint(sorted(os.listdir('.')))\nprint('__file__' in globals())\n"
    res = run_untrusted(program, SandboxLimits(timeout_s=10))
    assert res.passed, res
    assert res.stdout_tail == "[]\nFalse\n"


def test_infinite_loop_times_out() -> None:
    t0 = time.monotonic()
    res = run_untrusted("while True:\n    pass\n", SandboxLimits(timeout_s=1.5))
    assert res.status == "timeout" and not res.passed
    assert time.monotonic() - t0 < 5


def test_sleep_ignoring_sigterm_is_killed() -> None:
    marker = f"gsil-test-sleeper-{uuid.uuid4().hex}"
    child = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
    program = textwrap.dedent(
        f"""
        import os, signal, sys
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.execv(sys.executable, [sys.executable, "-c", {child!r}, {marker!r}])
        """
    )
    t0 = time.monotonic()
    res = run_untrusted(program, SandboxLimits(timeout_s=1.5), label=marker)
    assert res.status == "timeout"
    assert time.monotonic() - t0 < 6
    left = wait_gone(marker)
    kill_all(left)
    assert left == [], f"sandboxed processes survived: {left}"


def test_fork_bomb_is_contained() -> None:
    marker = f"gsil-test-forkbomb-{uuid.uuid4().hex}"
    program = textwrap.dedent(
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    t0 = time.monotonic()
    res = run_untrusted(program, SandboxLimits(timeout_s=5, max_processes=32), label=marker)
    assert not res.passed
    assert res.status in ("process_limit", "timeout"), res
    assert time.monotonic() - t0 < 10
    left = wait_gone(marker)
    kill_all(left)
    assert left == [], f"fork bomb processes survived: {len(left)}"


DAEMON = """
import ctypes, os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG = 0
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        code = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(600)"
        os.execv(sys.executable, [sys.executable, "-c", code, MARKER])
    os._exit(0)
time.sleep(0.5)
print("parent exits")
"""


def test_double_forked_daemon_is_killed() -> None:
    marker = f"gsil-test-daemon-{uuid.uuid4().hex}"
    program = f"MARKER = {marker!r}\n" + DAEMON
    res = run_untrusted(program, SandboxLimits(timeout_s=10))
    assert res.status == "passed", res  # the program itself ends normally ...
    left = wait_gone(marker)
    kill_all(left)
    assert left == [], f"daemon survived the sandbox: {left}"  # ... but its daemon is dead


def test_double_forked_daemon_control_without_sandbox() -> None:
    # Control: run unsandboxed, the same program leaves a daemon that the /proc scan sees.
    marker = f"gsil-test-daemon-ctl-{uuid.uuid4().hex}"
    program = f"MARKER = {marker!r}\n" + DAEMON
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, timeout=30)
    try:
        assert procs_with(marker), "control daemon not detected: the detector is broken"
    finally:
        kill_all(procs_with(marker))


def test_huge_allocation_fails_fast() -> None:
    res = run_untrusted(
        "x = bytearray(8 * 1024**3)\nprint(len(x))", SandboxLimits(timeout_s=10, memory_mb=512)
    )
    assert res.status == "failed" and not res.passed
    assert "MemoryError" in res.stderr_tail
    assert res.wall_s < 5


def _vandal_program(canary_dir: Path, repo_file: Path) -> str:
    return textwrap.dedent(
        f"""
        import os, shutil
        d = {str(canary_dir)!r}
        attempts = {{
            "create": lambda: open(os.path.join(d, "new.txt"), "w").write("pwned"),
            "overwrite": lambda: open(os.path.join(d, "canary.txt"), "w").write("pwned"),
            "append": lambda: open(os.path.join(d, "canary.txt"), "a").write("pwned"),
            "truncate": lambda: os.truncate(os.path.join(d, "canary.txt"), 0),
            "chmod": lambda: os.chmod(os.path.join(d, "canary.txt"), 0o777),
            "rename": lambda: os.rename(os.path.join(d, "canary.txt"), os.path.join(d, "moved")),
            "symlink": lambda: os.symlink("/etc/passwd", os.path.join(d, "link")),
            "mkdir": lambda: os.mkdir(os.path.join(d, "sub")),
            "repo": lambda: open({str(repo_file)!r}, "w").write("pwned"),
            "delete": lambda: os.remove(os.path.join(d, "canary.txt")),
            "rmtree": lambda: shutil.rmtree(d),
        }}
        for name, fn in attempts.items():
            try:
                fn()
                print(name, "SUCCEEDED")
            except Exception as exc:
                print(name, "blocked", type(exc).__name__)
        """
    )


def _make_canary(root: Path) -> Path:
    d = root / f"canary-{uuid.uuid4().hex}"
    d.mkdir()
    (d / "canary.txt").write_text("original")
    os.chmod(d / "canary.txt", 0o644)
    return d


def _assert_untouched(d: Path, repo_file: Path) -> None:
    assert sorted(p.name for p in d.iterdir()) == ["canary.txt"]
    assert (d / "canary.txt").read_text() == "original"
    assert (d / "canary.txt").stat().st_mode & 0o777 == 0o644
    assert not repo_file.exists()


def test_writes_and_deletes_outside_scratch_are_blocked(tmp_path: Path) -> None:
    d = _make_canary(tmp_path)
    repo_file = REPO / f".gsil-sandbox-canary-{uuid.uuid4().hex}"
    try:
        res = run_untrusted(_vandal_program(d, repo_file), SandboxLimits(timeout_s=10))
        assert res.status == "passed", res  # it catches its own errors and reaches the end
        assert "SUCCEEDED" not in res.stdout_tail, res.stdout_tail
        assert res.stdout_tail.count("blocked") == 11
        _assert_untouched(d, repo_file)
    finally:
        repo_file.unlink(missing_ok=True)


def test_vandal_control_without_sandbox(tmp_path: Path) -> None:
    # Control: unsandboxed, the same program really destroys the canary (and the checks see it).
    d = _make_canary(tmp_path)
    repo_file = tmp_path / "not-in-repo.txt"  # don't write into the repo for the control
    out = subprocess.run(
        [sys.executable, "-c", _vandal_program(d, repo_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "create SUCCEEDED" in out and "rmtree SUCCEEDED" in out
    assert not d.exists()  # the canary directory is gone


def test_uncaught_delete_outside_fails_and_canary_survives(tmp_path: Path) -> None:
    d = _make_canary(tmp_path)
    res = run_untrusted(
        f"import os\nos.remove({str(d / 'canary.txt')!r})\n", SandboxLimits(timeout_s=10)
    )
    assert res.status == "failed"
    assert (d / "canary.txt").read_text() == "original"


def test_scratch_dir_is_writable_private_and_removed() -> None:
    program = textwrap.dedent(
        """
        import os
        open("out.txt", "w").write("data" * 1000)
        os.makedirs("a/b", exist_ok=True)
        print(os.getcwd())
        print(open("out.txt").read()[:8])
        """
    )
    res = run_untrusted(program, SandboxLimits(timeout_s=10))
    assert res.passed, res
    cwd, content = res.stdout_tail.split()
    assert content == "datadata"
    assert not os.path.exists(cwd), "scratch directory was not cleaned up"


def test_file_size_limit() -> None:
    program = "open('big', 'wb').write(b'x' * (8 * 1024 * 1024))\n"
    res = run_untrusted(program, SandboxLimits(timeout_s=10, max_file_mb=1))
    assert not res.passed


def test_stdout_flood_is_capped_and_killed() -> None:
    program = "import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n"
    t0 = time.monotonic()
    res = run_untrusted(
        program, SandboxLimits(timeout_s=20, max_output_bytes=4 * 1024 * 1024, tail_bytes=1000)
    )
    assert res.status == "output_limit" and not res.passed
    assert len(res.stdout_tail) <= 1000
    assert time.monotonic() - t0 < 10


def test_output_tail_is_bounded_but_program_passes() -> None:
    res = run_untrusted(
        "print('x' * 200000)\nprint('END')", SandboxLimits(timeout_s=10, tail_bytes=500)
    )
    assert res.passed, res
    assert len(res.stdout_tail) <= 500 and res.stdout_tail.endswith("END\n")


def test_network_is_denied() -> None:
    if isolation_info().mode == "none":
        pytest.skip("no network namespace on this machine (a warning says so)")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        res = run_untrusted(program, SandboxLimits(timeout_s=10))
        assert res.status == "failed", res
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_concurrent_runs_are_independent() -> None:
    from concurrent.futures import ThreadPoolExecutor

    programs = [
        f"import os\nopen('f', 'w').write('{i}')\nprint(open('f').read())" for i in range(6)
    ]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda p: run_untrusted(p, SandboxLimits(timeout_s=20)), programs))
    assert [r.stdout_tail for r in results] == [f"{i}\n" for i in range(6)]
