"""Run untrusted (model-generated) Python code in an isolated, resource-limited process.

Threat model
============
Code produced by a model is treated as hostile: it may be buggy (infinite loops, huge
allocations, output floods), sloppy (``sys.exit(0)`` / ``os._exit(0)`` before the tests
run) or adversarial (fork bombs, double-forked daemons, writing or deleting files outside
its working directory, network access). The evaluation must survive all of this, must not
be modified by it, and must not count any of it as a pass. The harness itself may run as
root (CI does), so plain ``setrlimit`` and file permissions are NOT a defence: root can
fork past ``RLIMIT_NPROC`` and write anywhere.

Out of scope / residual risk (documented honestly):

* Confidentiality: the program may *read* any file readable by the invoking user (the
  filesystem is read-only, not hidden). With the network denied it can only leak what it
  reads into its own captured stdout/stderr.
* Kernel exploits: this is not a VM; a kernel 0-day escapes any namespace/LSM sandbox.
* In-process test forgery: HumanEval-style tests run in the same interpreter as the
  completion. A deliberately adversarial completion can defeat them (e.g. return an object
  whose ``__eq__`` is always true, monkeypatch builtins, or walk ``sys._getframe()`` up to
  the module code object and read the completion nonce from its constants, print it and
  exit). The nonce (below) reliably defends against *accidental* and *naive* false passes
  (early ``sys.exit(0)``/``os._exit(0)``/``quit()``, printing fake success markers,
  truncated programs), not against a completion engineered to forge it. Preventing that
  would need the tests to run in a different trust domain than the code under test.

Isolation layers (strongest available combination, probed once per process)
===========================================================================
Each call starts ``unshare(1)`` (util-linux, present on stock Debian) which creates new
**user + mount + PID + network + IPC + UTS** namespaces (``--map-root-user``, works for root
and for unprivileged users where the kernel allows user namespaces), forks
(``--fork --kill-child``) and mounts a fresh ``/proc``. Inside, a small trusted Python
*init* (this module run as a script, PID 1 of the new PID namespace) then:

1. **Read-only filesystem**: recursively marks every mount read-only + nosuid
   (``mount_setattr(AT_RECURSIVE)``, falling back to per-mount ``MS_REMOUNT|MS_BIND|MS_RDONLY``
   on kernels < 5.12) and mounts a size/inode-limited **tmpfs** over the scratch directory,
   the only writable place. Files written there never reach the host disk and vanish with
   the namespace.
2. **Landlock** (kernel LSM, ABI probed via ``landlock_create_ruleset``): an independent
   second layer that denies every write/create/delete/rename/truncate outside the scratch
   directory (``/dev/null`` stays writable) and, with ABI >= 6, sending signals to or
   connecting to abstract UNIX sockets of processes outside the sandbox.
3. **No privileges**: sets ``PR_SET_NO_NEW_PRIVS``, drops the whole capability bounding set,
   locks ``SECBIT_NOROOT`` and clears all capability sets, so the program - "root" inside
   its user namespace - cannot remount anything writable, cannot regain capabilities through
   ``execve`` and is subject to ``RLIMIT_NPROC``.
4. **Resource limits** on the program process (inherited by its children): ``RLIMIT_CPU``,
   ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE``, ``RLIMIT_NPROC`` (fork bombs), ``RLIMIT_CORE=0``.
   ``RLIMIT_NPROC`` is not applied by the kernel to uid 0 (the program *is* real uid 0 when
   the harness runs as root, user namespace or not), so the init also runs a
   **process-count watchdog**: it polls the PID namespace's ``/proc`` every 2 ms and, above
   ``max_processes``, exits, which kills the whole namespace (status ``process_limit``;
   observed overshoot of a Python fork bomb: ~10 processes).
5. **Process lifetime**: the init forks the program and waits; when the program exits the
   init exits and the kernel SIGKILLs every remaining process of the PID namespace
   (double-forked daemons included). The parent starts ``unshare`` in a new session and, on
   timeout or output overflow, SIGKILLs the whole process group; ``--kill-child`` and the
   PID-namespace semantics make that kill every descendant even if the program ignores
   SIGTERM, calls ``setsid`` or clears its parent-death signal.
6. **Network**: the new network namespace only has a down loopback device.
7. **Output**: stdout/stderr are pipes read by the parent with a bounded buffer (only the
   last ``tail_bytes`` are kept); more than ``max_output_bytes`` in total kills the program.

Fallbacks: if user namespaces are unavailable but the harness is root, the same namespaces
are created without a user namespace (capabilities are dropped as above). If no namespaces
can be created at all, the program runs as a plain child process with Landlock (if
available), dropped capabilities, rlimits, a child-subreaper init that SIGKILLs every
descendant at the end, and process-group kill on timeout; a ``RuntimeWarning`` then lists
exactly which guarantees are not enforced.

Completion nonce
================
With ``require_completion=True`` (default) the parent generates a 128-bit random nonce per
run and appends a final top-level statement to the program that flushes stdout and writes
the nonce on its own line. A run is ``passed`` only if the exit code is 0 **and** stdout ends
with that line, so exiting early (with status 0) is scored as ``early_exit``. The program
source is handed to the init through a file that is unlinked (and, in the full sandbox,
additionally hidden under the tmpfs) before any untrusted code runs, and is compiled with
the pseudo filename ``<sandboxed>`` (no ``__file__``), so the nonce cannot be read from disk.
See "In-process test forgery" above for what it does not protect against.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

__all__ = [
    "IsolationInfo",
    "SandboxResult",
    "isolation_info",
    "run_untrusted",
]

_SETUP_ERROR_MARK = "GSIL_SANDBOX_SETUP_ERROR"
_SETUP_ERROR_RC = 125
_PROC_LIMIT_MARK = "GSIL_SANDBOX_PROCESS_LIMIT"
_PROC_LIMIT_RC = 124
_PROGRAM_FILENAME = ".gsil_program.py"

# Namespace flag sets, strongest first.
_NS_FULL = [
    "--user",
    "--map-root-user",
    "--mount",
    "--pid",
    "--net",
    "--ipc",
    "--uts",
    "--fork",
    "--kill-child",
    "--mount-proc",
]
_NS_NO_USERNS = [f for f in _NS_FULL if f not in ("--user", "--map-root-user")]


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is one of ``"passed"`` (exit code 0 and, if required, the completion nonce
    was printed), ``"failed"`` (non-zero exit / uncaught exception / killed by a signal),
    ``"early_exit"`` (exit code 0 but the final nonce statement never ran), ``"timeout"``
    (wall-clock or CPU limit hit), ``"output_limit"`` (too much output),
    ``"process_limit"`` (more than ``max_processes`` processes) or ``"error"``
    (the sandbox itself could not be set up).
    """

    status: str
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    wall_s: float
    isolation: str = ""

    @property
    def passed(self) -> bool:
        """True iff the program ran to its end successfully."""
        return self.status == "passed"


@dataclass(frozen=True)
class SandboxLimits:
    """The resource limits of one sandboxed program (see the module docs for how each is
    enforced).

    ``timeout_s``: wall-clock limit; the whole process tree is SIGKILLed when it expires.
    ``memory_mb``: address-space limit (``RLIMIT_AS``) of the program process.
    ``cpu_s``: CPU-time limit (``RLIMIT_CPU``); None: ``timeout_s + 1``.
    ``max_processes``: ``RLIMIT_NPROC`` and the process-count watchdog (fork-bomb guard).
    ``max_file_mb``: ``RLIMIT_FSIZE``: largest file the program may write.
    ``scratch_mb``: size of the tmpfs scratch directory (its working directory).
    ``max_output_bytes``: total stdout+stderr bytes after which the program is killed.
    ``tail_bytes``: how many trailing bytes of stdout / stderr are kept in the result.
    """

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: float | None = None
    max_processes: int = 64
    max_file_mb: int = 16
    scratch_mb: int = 64
    max_output_bytes: int = 8 * 1024 * 1024
    tail_bytes: int = 16 * 1024


@dataclass(frozen=True)
class IsolationInfo:
    """What the sandbox can enforce on this machine (see :func:`isolation_info`)."""

    mode: str  # "userns" | "namespaces" | "none"
    unshare_args: tuple[str, ...]
    landlock_abi: int
    not_enforced: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One-line human readable summary."""
        layers = {
            "userns": "user+mount+pid+net+ipc+uts namespaces, read-only mounts, tmpfs scratch",
            "namespaces": "mount+pid+net+ipc+uts namespaces, read-only mounts, tmpfs scratch",
            "none": "no namespaces",
        }[self.mode]
        ll = f"landlock ABI {self.landlock_abi}" if self.landlock_abi > 0 else "no landlock"
        return f"{layers}; {ll}; caps dropped + no_new_privs; rlimits"


# --------------------------------------------------------------------------------------
# Low-level helpers (used by the in-sandbox init; stdlib + ctypes only)
# --------------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


def _syscall(nr: int, *args: object) -> int:
    libc = _get_libc()
    libc.syscall.restype = ctypes.c_long
    res = libc.syscall(ctypes.c_long(nr), *args)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(res)


# These syscall numbers are shared by all architectures (added after the unified table).
_NR_MOUNT_SETATTR = 442
_NR_LANDLOCK_CREATE_RULESET = 444
_NR_LANDLOCK_ADD_RULE = 445
_NR_LANDLOCK_RESTRICT_SELF = 446


def landlock_abi() -> int:
    """Return the Landlock ABI version supported by the running kernel (0 if none)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return _syscall(_NR_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except OSError:
        return 0


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_LL_WRITE_FILE = 1 << 1
_LL_REMOVE_DIR = 1 << 4
_LL_REMOVE_FILE = 1 << 5
_LL_MAKE_CHAR = 1 << 6
_LL_MAKE_DIR = 1 << 7
_LL_MAKE_REG = 1 << 8
_LL_MAKE_SOCK = 1 << 9
_LL_MAKE_FIFO = 1 << 10
_LL_MAKE_BLOCK = 1 << 11
_LL_MAKE_SYM = 1 << 12
_LL_REFER = 1 << 13  # ABI 2
_LL_TRUNCATE = 1 << 14  # ABI 3
_LL_SCOPE_ABSTRACT_UNIX = 1 << 0  # ABI 6
_LL_SCOPE_SIGNAL = 1 << 1  # ABI 6


def _apply_landlock(writable_dir: str, abi: int) -> None:
    """Deny all filesystem writes outside ``writable_dir`` (and /dev/null) for this process."""
    handled = (
        _LL_WRITE_FILE
        | _LL_REMOVE_DIR
        | _LL_REMOVE_FILE
        | _LL_MAKE_CHAR
        | _LL_MAKE_DIR
        | _LL_MAKE_REG
        | _LL_MAKE_SOCK
        | _LL_MAKE_FIFO
        | _LL_MAKE_BLOCK
        | _LL_MAKE_SYM
    )
    if abi >= 2:
        handled |= _LL_REFER
    if abi >= 3:
        handled |= _LL_TRUNCATE
    attr = _LandlockRulesetAttr(handled, 0, 0)
    size = 8  # only handled_access_fs
    if abi >= 6:
        attr.scoped = _LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL
        size = ctypes.sizeof(_LandlockRulesetAttr)
    ruleset_fd = _syscall(
        _NR_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    try:
        file_rights = _LL_WRITE_FILE | (_LL_TRUNCATE if abi >= 3 else 0)
        for path, rights in ((writable_dir, handled), ("/dev/null", file_rights)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _LandlockPathBeneathAttr(rights, fd)
                _syscall(
                    _NR_LANDLOCK_ADD_RULE,
                    ctypes.c_int(ruleset_fd),
                    ctypes.c_int(1),  # LANDLOCK_RULE_PATH_BENEATH
                    ctypes.byref(rule),
                    ctypes.c_uint32(0),
                )
            finally:
                os.close(fd)
        _syscall(_NR_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
    finally:
        os.close(ruleset_fd)


_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4
# SECBIT_NOROOT | _LOCKED | NO_SETUID_FIXUP | _LOCKED | KEEP_CAPS_LOCKED | NO_CAP_AMBIENT_RAISE(+LOCKED)
_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80


def _prctl(option: int, arg2: int = 0) -> None:
    libc = _get_libc()
    res = libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _proc_status_caps() -> dict[str, int]:
    caps = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "CapInh:")):
                key, val = line.split(":", 1)
                caps[key] = int(val.strip(), 16)
    return caps


def _drop_privileges() -> None:
    """no_new_privs + drop every capability (bounding, ambient, effective/permitted/inheritable)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    libc = _get_libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            last_cap = int(fh.read())
    except OSError:
        last_cap = 63
    if _proc_status_caps().get("CapEff", 0):
        for cap in range(last_cap + 1):
            try:
                _prctl(_PR_CAPBSET_DROP, cap)
            except OSError:
                pass
        try:
            _prctl(_PR_SET_SECUREBITS, _SECUREBITS)
        except OSError:
            pass
    try:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass

    class _CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class _CapData(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    hdr = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    caps = _proc_status_caps()
    if caps.get("CapEff", 0) or caps.get("CapPrm", 0) or caps.get("CapAmb", 0):
        raise OSError(f"capabilities still present after drop: {caps}")
    if os.geteuid() == 0 and caps.get("CapBnd", 0):
        raise OSError(f"bounding set not empty for uid 0: {caps}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_RELATIME = 1 << 21
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None):
    libc = _get_libc()
    res = libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data is not None else None,
    )
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))
    return points


def _remount_all_readonly() -> None:
    """Make every mount of this mount namespace read-only and nosuid."""
    attr = _MountAttr(_MS_RDONLY | _MS_NOSUID, 0, 0, 0)  # MOUNT_ATTR_RDONLY=1, NOSUID=2
    try:
        _syscall(
            _NR_MOUNT_SETATTR,
            ctypes.c_int(-100),  # AT_FDCWD
            b"/",
            ctypes.c_uint(0x8000),  # AT_RECURSIVE
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        return
    except OSError:
        pass  # kernel < 5.12: per-mount remount below
    keep = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_NOATIME | _MS_NODIRATIME | _MS_RELATIME
    for mp in _mountpoints():
        try:
            st = os.statvfs(mp)
        except OSError:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | (st.f_flag & keep)
        try:
            _mount(None, mp, None, flags, None)
        except OSError:
            if mp == "/":
                raise


def _setup_mounts(scratch: str, scratch_mb: int) -> None:
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
    _remount_all_readonly()
    _mount(
        "gsil-scratch",
        scratch,
        "tmpfs",
        _MS_NOSUID | _MS_NODEV,
        f"size={int(scratch_mb)}m,nr_inodes=16384,mode=0700",
    )
    probe = os.path.join(scratch, ".w")
    with open(probe, "w") as fh:
        fh.write("x")
    os.unlink(probe)
    try:
        with open("/.gsil-ro-check", "w"):
            pass
    except OSError:
        pass
    else:  # pragma: no cover - would mean the remount silently failed
        os.unlink("/.gsil-ro-check")
        raise OSError("root filesystem still writable after read-only remount")


def _kill_descendants() -> None:
    """SIGKILL every (reparented) descendant of this child-subreaper and reap them."""
    for _ in range(10000):
        kids: list[int] = []
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/children") as fh:
                    kids.extend(int(p) for p in fh.read().split())
        except OSError:
            pass
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if not kids:
                return
        if not kids:
            return
        time.sleep(0.001)


def _init_main(cfg: dict) -> None:  # pragma: no cover - runs inside the sandbox
    """Trusted init inside the sandbox: set up isolation, fork the program, wait, exit."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    scratch = cfg["scratch"]
    try:
        prog_path = os.path.join(scratch, _PROGRAM_FILENAME)
        with open(prog_path, encoding="utf-8") as fh:
            source = fh.read()
        os.unlink(prog_path)
        if cfg["mounts"]:
            _setup_mounts(scratch, cfg["scratch_mb"])
        os.chdir(scratch)
        if not cfg["pidns"]:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        if cfg["landlock_abi"] > 0:
            _apply_landlock(scratch, cfg["landlock_abi"])
        _drop_privileges()
        _prctl(_PR_SET_DUMPABLE, 0)
    except BaseException as exc:  # noqa: BLE001
        sys.stderr.write(f"{_SETUP_ERROR_MARK}: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(_SETUP_ERROR_RC)

    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _prctl(_PR_SET_DUMPABLE, 1)
            cpu = int(cfg["cpu_s"])
            limits = [
                (resource.RLIMIT_CPU, cpu, cpu + 1),
                (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
                (resource.RLIMIT_FSIZE, cfg["fsize_bytes"], cfg["fsize_bytes"]),
                (resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"]),
                (resource.RLIMIT_CORE, 0, 0),
            ]
            for res, soft, hard in limits:
                resource.setrlimit(res, (soft, hard))
            devnull = os.open("/dev/null", os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            os.environ.clear()
            os.environ.update(env)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.argv = ["<sandboxed>"]
            code_obj = compile(source, "<sandboxed>", "exec")
            del source
            import types

            main_mod = types.ModuleType("__main__")
            sys.modules["__main__"] = main_mod
            glb = main_mod.__dict__
            try:
                exec(code_obj, glb)
                code = 0
            except SystemExit as exc:
                if exc.code is None:
                    code = 0
                elif isinstance(exc.code, int):
                    code = exc.code & 0xFF
                else:
                    sys.stderr.write(f"{exc.code}\n")
                    code = 1
        except BaseException:  # noqa: BLE001
            import traceback

            try:
                etype, exc, tb = sys.exc_info()
                # hide the harness frame
                traceback.print_exception(etype, exc, tb.tb_next if tb is not None else tb)
            except BaseException:  # noqa: BLE001
                pass
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                pass
            os._exit(code)

    status = 1
    max_procs = int(cfg["nproc"]) + 1  # + this init
    while True:
        try:
            wpid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if wpid == pid:
            status = os.waitstatus_to_exitcode(wstatus)
            if status < 0:
                status = 128 + (-status)
            break
        if wpid:
            continue  # reaped an orphan; look again at once
        if cfg["pidns"]:
            # Process-count watchdog: RLIMIT_NPROC does not apply to (namespaced) uid 0,
            # so count the processes of this PID namespace and kill them all if too many.
            try:
                n = sum(1 for d in os.listdir("/proc") if d.isdigit())
            except OSError:
                n = 0
            if n > max_procs:
                sys.stderr.write(f"\n{_PROC_LIMIT_MARK}: {n} processes > {max_procs - 1}\n")
                sys.stderr.flush()
                os._exit(_PROC_LIMIT_RC)  # the kernel now SIGKILLs the whole namespace
        time.sleep(0.002)
    if not cfg["pidns"]:
        _kill_descendants()
    os._exit(status & 0xFF)


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------


def _base_cmd(unshare_args: tuple[str, ...]) -> list[str]:
    cmd: list[str] = []
    if unshare_args:
        cmd += [shutil.which("unshare") or "unshare", *unshare_args, "--"]
    cmd += [sys.executable, "-I", os.path.abspath(__file__), "--gsil-sandbox-init"]
    return cmd


_probe_lock = threading.Lock()


@functools.cache
def _probe() -> IsolationInfo:
    abi = landlock_abi()
    candidates: list[tuple[str, tuple[str, ...]]] = []
    if shutil.which("unshare") and sys.platform.startswith("linux"):
        candidates.append(("userns", tuple(_NS_FULL)))
        if os.geteuid() == 0:
            candidates.append(("namespaces", tuple(_NS_NO_USERNS)))
    candidates.append(("none", ()))
    errors = []
    for mode, args in candidates:
        info = IsolationInfo(mode, args, abi)
        res = _run(info, "print('gsil-probe-ok')", SandboxLimits(timeout_s=20.0), nonce=True)
        if res.passed and "gsil-probe-ok" in res.stdout_tail:
            break
        errors.append(f"{mode}: {res.status} rc={res.returncode} {res.stderr_tail.strip()[-300:]}")
    else:
        raise RuntimeError("sandbox cannot run any program on this machine: " + "; ".join(errors))
    missing: list[str] = []
    if mode == "none":
        missing += [
            "no PID namespace (descendants are killed by a child-subreaper init and process "
            "group kill, best effort)",
            "no network isolation (network access is NOT denied)",
            "no read-only mount namespace / tmpfs scratch",
            "no IPC namespace",
        ]
        if abi <= 0:
            missing.append(
                "NO filesystem write protection at all outside the scratch dir "
                "(no namespaces and no Landlock)"
                + (" - running as root!" if os.geteuid() == 0 else "")
            )
        else:
            missing.append(
                "chmod/chown/utime of existing files outside the scratch dir "
                "(Landlock does not cover metadata changes)"
            )
        if abi < 6:
            missing.append("signals to processes outside the sandbox are not blocked")
        if os.geteuid() == 0:
            missing.append(
                "process-count limit (RLIMIT_NPROC does not apply to root and there is no "
                "PID-namespace watchdog): fork bombs only end at the timeout"
            )
    info = IsolationInfo(mode, args, abi, tuple(missing))
    if missing:
        warnings.warn(
            "gsil sandbox running with reduced isolation ("
            + "; ".join(errors)
            + "). NOT enforced: "
            + "; ".join(missing),
            RuntimeWarning,
            stacklevel=3,
        )
    return info


def isolation_info() -> IsolationInfo:
    """Probe (once per process) and return the isolation level the sandbox uses here."""
    with _probe_lock:
        return _probe()


def _decode_tail(buf: bytearray) -> str:
    return bytes(buf).decode("utf-8", errors="replace")


def _run(
    info: IsolationInfo,
    program: str,
    limits: SandboxLimits,
    *,
    nonce: bool = True,
    label: str = "",
) -> SandboxResult:
    timeout_s, cpu_s = limits.timeout_s, limits.cpu_s
    max_output_bytes, tail_bytes = limits.max_output_bytes, limits.tail_bytes
    marker = secrets.token_hex(16) if nonce else ""
    if nonce:
        program = (
            program
            + "\n\n# gsil-sandbox: reached the end of the program\n"
            + "import sys as _gsil_sys\n_gsil_sys.stdout.flush()\n"
            + f"_gsil_sys.stdout.write('\\n{marker}\\n')\n_gsil_sys.stdout.flush()\n"
        )
    scratch = tempfile.mkdtemp(prefix="gsil-sbx-")
    t0 = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    try:
        os.chmod(scratch, 0o700)
        with open(os.path.join(scratch, _PROGRAM_FILENAME), "w", encoding="utf-8") as fh:
            fh.write(program)
        cfg = {
            "scratch": scratch,
            "mounts": info.mode != "none",
            "pidns": info.mode != "none",
            "landlock_abi": info.landlock_abi,
            "scratch_mb": int(limits.scratch_mb),
            "cpu_s": max(1, int(cpu_s if cpu_s is not None else timeout_s + 1)),
            "memory_bytes": int(limits.memory_mb) * 1024 * 1024,
            "fsize_bytes": int(limits.max_file_mb) * 1024 * 1024,
            "nproc": int(limits.max_processes),
            "label": str(label),
        }
        cmd = [*_base_cmd(info.unshare_args), json.dumps(cfg)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=scratch,
        )
        deadline = t0 + timeout_s
        bufs = {"out": bytearray(), "err": bytearray()}
        total = 0
        timed_out = overflow = False
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        open_streams = 2
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                total += len(chunk)
                buf = bufs[key.data]
                buf += chunk
                if len(buf) > tail_bytes:
                    del buf[: len(buf) - tail_bytes]
            if total > max_output_bytes:
                overflow = True
                break
        sel.close()
        if not (timed_out or overflow):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out or overflow:
            _kill_tree(proc)
        rc = proc.wait()
        wall = time.monotonic() - t0
        out, err = _decode_tail(bufs["out"]), _decode_tail(bufs["err"])
        if timed_out:
            status = "timeout"
        elif overflow:
            status = "output_limit"
        elif rc == _SETUP_ERROR_RC and _SETUP_ERROR_MARK in err:
            status = "error"
        elif rc == _PROC_LIMIT_RC and _PROC_LIMIT_MARK in err:
            status = "process_limit"
        elif rc == 0:
            suffix = f"\n{marker}\n"
            if not nonce:
                status = "passed"
            elif out.endswith(suffix):
                status = "passed"
                out = out[: -len(suffix)]
            else:
                status = "early_exit"
        elif rc in (128 + signal.SIGXCPU, -signal.SIGXCPU):
            status = "timeout"
        else:
            status = "failed"
        return SandboxResult(status, rc, out, err, wall, info.mode)
    finally:
        if proc is not None:
            if proc.poll() is None:
                _kill_tree(proc)
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the sandbox: its direct children (the namespace init) and its process group."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as fh:
            kids = [int(p) for p in fh.read().split()]
    except OSError:
        kids = []
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_untrusted(
    program: str,
    limits: SandboxLimits | None = None,
    *,
    require_completion: bool = True,
    label: str = "",
) -> SandboxResult:
    """Run the Python ``program`` in a fresh isolated process and report how it ended.

    Args:
        program: Python source code (run as ``__main__`` in a fresh interpreter state).
        limits: its time, memory, process, file and output limits (None: the defaults of
            :class:`SandboxLimits`).
        require_completion: append a nonce statement and require it (see module docs);
            otherwise exit code 0 alone means ``"passed"``.
        label: free text placed in the sandbox init's command line (visible in ``ps``).

    Returns:
        A :class:`SandboxResult`.
    """
    info = isolation_info()
    return _run(info, program, limits or SandboxLimits(), nonce=require_completion, label=label)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--gsil-sandbox-init":
    _init_main(json.loads(sys.argv[2]))
