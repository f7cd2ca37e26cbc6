"""gpt-oss's `python` tool: a stateful Python interpreter per conversation, in a sandbox of plain Linux parts.

gpt-oss was trained with a `python` tool that runs code "in a stateful Jupyter notebook environment".
OpenAI's reference runs it in docker; this runs a child interpreter (`python -I -S`: the standard library
only, nothing from site-packages, no environment variables read) under kernel namespaces and resource
limits, with nothing to install. The child is `sandbox_worker.py`, where its processes and pipes are
described. Linux only; `sandbox_unavailable()` says why a machine cannot run it.

The sandbox is strongest when the server runs as the machine's root (uid 0 outside any user namespace):
each sandbox then runs as a uid and gid of its own (2**30 and up, no supplementary groups). Otherwise (a
normal user, or root of a rootless container) it runs as the server's own user inside a user namespace,
which is what lets it make the network and PID namespaces without privileges; see the last point below.

What it protects against:
- the network: the code runs in a network namespace of its own, where only a loopback that is down
  exists. It reaches no address at all: not the internet, not the machine's other services, not the
  server itself on 127.0.0.1, and no DNS;
- runaway code: each run has a wall-clock limit (`timeout_s`), past which every process of the sandbox
  is killed and the next run starts a fresh interpreter; the interpreter has a CPU-time limit (`cpu_s`),
  every process an address-space limit (`memory_bytes`) and a file-size limit (`file_bytes`), 256 open
  files and no core dumps; what a run prints is read as it comes and cut to `output_bytes`;
- fork bombs and leftovers: the sandbox has at most `max_processes` processes (threads and zombies
  count), and it lives in a PID namespace of its own, so that stopping it kills every process in it,
  also those that detached (setsid, double fork); `close()` returns once they are all gone. Its
  processes see no PID outside, so they cannot signal or trace processes outside by PID;
- privileges and secrets: it keeps no capability and cannot gain one (no_new_privs: setuid programs do
  not raise it), and it gets a minimal environment (PATH, HOME and TMPDIR set to its working folder,
  LANG), so it does not see the server's API keys or tokens; stdin is /dev/null. As the machine's root,
  with a uid of its own, it cannot read what the server's user alone may (the server's files that are
  not world-readable, its /proc entries such as environ), cannot touch other conversations' working
  folders or processes, and its process limit counts its own processes alone.

What it does not protect against:
- reading the machine: there is no mount namespace. The code reads every file its user may (all that
  is world-readable), the machine's /proc (every process and its command line: do not put secrets on
  command lines) and /sys, and uses the Unix sockets and device files its user may open (D-Bus' system
  bus, a world-writable GPU device). It writes where its user may (its working folder, /tmp, /dev/shm),
  and disk use as a whole is not limited, only each file's size;
- sharing the machine: limits are per process (no cgroups), so memory can reach
  `max_processes * memory_bytes`, and processes the code leaves running between runs keep using CPU
  until their own CPU limit or until the sandbox is stopped;
- the kernel: it is the machine's kernel, so a kernel exploit escapes (and where the machine lets normal
  users make user namespaces, the code can reach more of the kernel through them); side channels stay;
- a server that is not the machine's root: the code runs as the server's user, so it can read and write
  every file of that user, read the server's environment in /proc/<pid>/environ and, where
  kernel.yama.ptrace_scope is 0, its memory. The network isolation, the limits and the killing stay as
  they are (on kernels before 5.14, where the process limit counts every process of the user, it is the
  user's current count plus `max_processes`). For conversations with users who are not trusted, run the
  server as root, in a container or VM of its own.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gptoss.errors import GptossError

_WORKER = Path(__file__).with_name("sandbox_worker.py")
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_OPEN_FILES = 256
_MAX_MESSAGE_BYTES = 4096
_UID_BASE = 1 << 30  # uids from here on are no one's; each server process takes 256 (pids are below 2**22)


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandbox may use; the module's docstring says what each limit holds back and what not."""

    timeout_s: float = 30.0  # wall clock of one run(); past it the sandbox is killed and its state lost
    cpu_s: int = 120  # CPU time of the interpreter process, all runs together
    memory_bytes: int = 1 << 30  # address space of each process
    max_processes: int = 32  # processes and threads of the sandbox together
    output_bytes: int = 16384  # what a run() returns is cut to this, with a note saying how much was cut
    file_bytes: int = 64 << 20  # size of each file written


class SandboxError(GptossError):
    """The sandbox cannot be set up on this machine, or could not be started."""


@cache
def sandbox_unavailable() -> str | None:
    """None when this machine can run the sandbox, else why not; found out once, by starting one."""
    try:
        PythonSandbox().close()
    except SandboxError as exc:
        return str(exc)
    return None


class PythonSandbox:
    """One stateful interpreter, for one conversation: the cells of its runs share one namespace.

    Thread-safe: runs are taken one at a time, and close() from another thread ends a run in progress.
    """

    def __init__(self, limits: SandboxLimits = SandboxLimits()):
        _check_platform()
        self.limits = limits
        self._lock = threading.Lock()  # held by a run, and by close() to stop the interpreter
        self._closed = False
        self._interpreter: _Interpreter | None = None
        self._user = _take_user() if _is_machine_root() else None
        try:
            self.workdir = _make_workdir(self._user)
        except OSError as exc:
            _give_back_user(self._user)
            raise SandboxError(f"cannot make the Python sandbox's working folder: {exc}") from exc
        try:
            self._interpreter = _Interpreter(self.workdir, limits, self._user)
        except BaseException:
            self.close()
            raise

    def run(self, code: str) -> str:
        """Runs code and returns what the model sees: what it printed, stdout and stderr in order, then
        the repr of a final expression or the traceback of an exception. Never raises for what the code
        does: when the interpreter is gone (timed out, killed, exited), the text says so, and the next
        run starts a fresh one."""
        with self._lock:
            if self._interpreter is None and not self._closed:
                try:
                    self._interpreter = _Interpreter(self.workdir, self.limits, self._user)
                except SandboxError as exc:
                    return f"The Python interpreter could not be restarted ({exc})."
            if self._closed:  # checked after the start: close() either sees this interpreter or is seen here
                return "This Python session was closed; its state is lost."
            output = _Output(self.limits.output_bytes)
            ending = self._interpreter.execute(code, self.limits.timeout_s, output)
            if ending is not None:
                self._interpreter.stop()
                self._interpreter = None
                ending = ("The Python session was closed during the run; its state is lost." if self._closed
                          else f"{ending}. The interpreter's state is lost; the next run starts a fresh one.")
        text = output.text()
        if ending is not None:
            text += ("\n" if text and not text.endswith("\n") else "") + ending
        return text or "(no output)"

    def close(self) -> None:
        """Kills every process of the sandbox and removes its working folder; idempotent."""
        self._closed = True
        if (interpreter := self._interpreter) is not None:
            interpreter.interrupt()  # ends a run in progress now, which frees the lock
        with self._lock:
            if self._interpreter is not None:
                self._interpreter.stop()
                self._interpreter = None
            if self.workdir.exists():
                _remove_tree(self.workdir)
            _give_back_user(self._user)
            self._user = None

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PythonSessions:
    """The server's sandboxes: one per conversation key, made on first use. Thread-safe.

    A sandbox holds processes and a folder, so they are bounded: ones idle for more than `idle_s` and,
    beyond `max_sessions`, the least recently used are closed (their next run says so).
    """

    def __init__(self, limits: SandboxLimits = SandboxLimits(), idle_s: float = 600, max_sessions: int = 16):
        self.limits = limits
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, tuple[PythonSandbox, float]] = OrderedDict()  # least recent first

    def get(self, key: str) -> PythonSandbox:
        now = time.monotonic()
        with self._lock:
            retired = []
            while self._sessions and now - next(iter(self._sessions.values()))[1] > self.idle_s:
                retired.append(self._sessions.popitem(last=False)[1][0])
            sandbox = self._sessions.pop(key)[0] if key in self._sessions else PythonSandbox(self.limits)
            self._sessions[key] = (sandbox, now)
            while len(self._sessions) > self.max_sessions:
                retired.append(self._sessions.popitem(last=False)[1][0])
        for old in retired:  # outside the lock: closing waits for the processes to end
            old.close()
        return sandbox

    def close(self, key: str) -> None:
        with self._lock:
            entry = self._sessions.pop(key, None)
        if entry is not None:
            entry[0].close()

    def close_all(self) -> None:
        with self._lock:
            sandboxes = [sandbox for sandbox, _ in self._sessions.values()]
            self._sessions.clear()
        for sandbox in sandboxes:
            sandbox.close()


def _check_platform() -> None:
    if sys.platform != "linux":
        raise SandboxError("the Python sandbox needs Linux (namespaces, resource limits)")
    try:
        os.close(os.pidfd_open(os.getpid()))  # the launcher waits for init through one
    except OSError as exc:
        raise SandboxError(f"the Python sandbox needs Linux 5.3 or newer (pidfd_open: {exc.strerror})") from exc


class _Interpreter:
    """One process tree of sandbox_worker.py and the server's ends of its pipes."""

    def __init__(self, workdir: Path, limits: SandboxLimits, user: tuple[int, int] | None):
        config = {"user": user, "rlimits": _rlimits(limits, user)}  # no user: in a user namespace, as the server
        command_r, self._commands = os.pipe()
        self._replies, reply_w = os.pipe()
        self._output, output_w = os.pipe()
        config.update(command_fd=command_r, reply_fd=reply_w)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_WORKER), json.dumps(config)], stdin=subprocess.PIPE,
                stdout=output_w, stderr=output_w, pass_fds=(command_r, reply_w), cwd=workdir, env=env,
                start_new_session=True)
        except OSError as exc:
            self._close_pipes()
            raise SandboxError(f"cannot start the Python sandbox: {exc}") from exc
        finally:
            for fd in (command_r, reply_w, output_w):
                os.close(fd)
        for fd in (self._commands, self._replies, self._output):
            os.set_blocking(fd, False)
        self._frames = bytearray()
        self._limits = limits
        startup = _Output(limits.output_bytes)
        message = self._exchange(b"", time.monotonic() + _START_TIMEOUT_S, startup)
        if message is None or "ready" not in message:
            self.stop()
            if message is None:
                reason = f"it did not start within {_START_TIMEOUT_S:g} s"
            elif "exit" in message:
                reason = _describe_exit(message["exit"], limits)
            else:
                reason = message.get("error") or message.get("lost", "it sent an unexpected message")
            printed = startup.text().strip()
            raise SandboxError(f"cannot start the Python sandbox: {reason}" + (f"\n{printed}" if printed else ""))

    def execute(self, code: str, timeout_s: float, output: _Output) -> str | None:
        """Runs code, adding what it prints to output; None if the interpreter is ready for more, else why
        it is gone (the caller then stops it)."""
        data = code.encode("utf-8", "surrogatepass")
        message = self._exchange(struct.pack(">I", len(data)) + data, time.monotonic() + timeout_s, output)
        if message is None:
            return f"Execution timed out after {timeout_s:g} s, so the interpreter was stopped"
        if "done" in message:
            return None
        if "exit" in message:
            return _describe_exit(message["exit"], self._limits)
        return message.get("lost", "The code wrote to the interpreter's reply pipe")

    def _exchange(self, request: bytes, deadline: float, output: _Output) -> dict | None:
        """Writes request to the command pipe and reads the output pipe until the next message, which it
        returns; {"lost": why} when the reply pipe ends or breaks, None at the deadline."""
        replies_ended = False
        poller = select.poll()  # not select(): a busy server has descriptors past FD_SETSIZE
        poller.register(self._output, select.POLLIN)
        poller.register(self._replies, select.POLLIN)
        if request:
            poller.register(self._commands, select.POLLOUT)
        while (message := self._next_message(replies_ended)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            for fd, _ in poller.poll(remaining * 1000):
                if fd == self._commands:
                    try:
                        request = request[os.write(fd, request):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the interpreter is gone; the reply pipe will say how
                        request = b""
                    if not request:
                        poller.unregister(fd)
                elif fd == self._output:
                    if data := os.read(fd, 1 << 16):
                        output.add(data)
                    else:
                        poller.unregister(fd)
                elif data := os.read(fd, 1 << 16):
                    self._frames += data
                else:
                    replies_ended = True
                    poller.unregister(fd)
        self._drain(output)  # what was printed before the message is all in the pipe by now
        return message

    def _next_message(self, replies_ended: bool) -> dict | None:
        broken = {"lost": "The code wrote to the interpreter's reply pipe"}
        if len(self._frames) >= 4:
            (size,) = struct.unpack(">I", self._frames[:4])
            if size > _MAX_MESSAGE_BYTES:
                return broken
            if len(self._frames) >= 4 + size:
                body, self._frames = self._frames[4:4 + size], self._frames[4 + size:]
                try:
                    message = json.loads(body)
                except ValueError:
                    return broken
                return message if isinstance(message, dict) else broken
        return {"lost": "The interpreter stopped unexpectedly"} if replies_ended else None

    def _drain(self, output: _Output) -> None:
        try:
            while data := os.read(self._output, 1 << 16):
                output.add(data)
        except BlockingIOError:
            pass

    def interrupt(self) -> None:
        """Asks the launcher to kill the sandbox, from any thread: closing its stdin, the lifeline."""
        self._process.stdin.close()

    def stop(self) -> None:
        """Kills the sandbox and returns once all of its processes are gone."""
        self.interrupt()
        try:
            self._process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # A fork of the server holds the lifeline open too, or the launcher is stuck: its process group
            # holds init, whose death ends the namespace.
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for fd in (self._commands, self._replies, self._output):
            os.close(fd)


class _Output:
    """What a run printed, within `limit` bytes: its first and its last half, and how much was cut between."""

    def __init__(self, limit: int):
        self._head_size = limit // 2
        self._tail_size = limit - self._head_size
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0

    def add(self, data: bytes) -> None:
        self._total += len(data)
        room = self._head_size - len(self._head)
        self._head += data[:room]
        self._tail += data[room:]
        if len(self._tail) > self._tail_size:
            del self._tail[:len(self._tail) - self._tail_size]

    def text(self) -> str:
        cut = self._total - len(self._head) - len(self._tail)
        if not cut:
            return (self._head + self._tail).decode("utf-8", "replace")
        head, tail = self._head.decode("utf-8", "replace"), self._tail.decode("utf-8", "replace")
        return f"{head}\n[... {cut} bytes of output cut ...]\n{tail}"


def _describe_exit(status: int, limits: SandboxLimits) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"The interpreter exited with status {code}"
    killed = f"The interpreter was killed by signal {-code} ({signal.strsignal(-code)})"
    if -code == signal.SIGXCPU:
        return f"{killed}: it used up its {limits.cpu_s} s of CPU time"
    return killed


def _rlimits(limits: SandboxLimits, user: tuple[int, int] | None) -> dict[str, tuple[int, int]]:
    """The resource limits of the sandbox's processes, by name of the resource module's constant."""
    return {
        # Past the soft limit the kernel sends SIGXCPU, which kills; a second later SIGKILL.
        "RLIMIT_CPU": (limits.cpu_s, limits.cpu_s + 1),
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.file_bytes, limits.file_bytes),
        "RLIMIT_NPROC": (nproc := _process_limit(limits.max_processes, user), nproc),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NOFILE": (_OPEN_FILES, _OPEN_FILES),
    }


def _process_limit(max_processes: int, user: tuple[int, int] | None) -> int:
    """RLIMIT_NPROC, which counts the processes of the real uid. As the machine's root, the sandbox's uid
    is its own; otherwise, since Linux 5.14, the count is per user namespace, and the sandbox has one of
    its own; before, every process of the user counts, those outside the sandbox too."""
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if user is not None or (release is not None and tuple(map(int, release.groups())) >= (5, 14)):
        return max_processes
    uid = os.getuid()
    return max_processes + sum(1 for entry in os.scandir("/proc") if entry.name.isdigit()
                               and _owner(entry.path) == uid)


def _owner(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:  # the process ended meanwhile
        return None


_users_lock = threading.Lock()
_users_taken: set[int] = set()


def _is_machine_root() -> bool:
    """uid 0 of the machine, with every uid to give; not root in a user namespace (a rootless container)."""
    try:
        return os.geteuid() == 0 and Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _take_user() -> tuple[int, int]:
    """A uid and gid that no one else has, for one sandbox of a server running as root."""
    base = _UID_BASE + (os.getpid() << 8)
    with _users_lock:
        uid = next((base + i for i in range(256) if base + i not in _users_taken), None)
        if uid is None:
            raise SandboxError("more than 256 Python sandboxes at once")
        _users_taken.add(uid)
    return uid, uid


def _give_back_user(user: tuple[int, int] | None) -> None:
    if user is not None:
        with _users_lock:
            _users_taken.discard(user[0])


def _make_workdir(user: tuple[int, int] | None) -> Path:
    """A fresh folder for the sandbox, owned by its user and for it alone."""
    workdir = Path(tempfile.mkdtemp(prefix="gptoss-python-"))
    if user is not None:
        try:
            os.chown(workdir, *user)
        except OSError:
            workdir.rmdir()
            raise
    return workdir


def _remove_tree(path: Path) -> None:
    """Removes the working folder, also where the code made folders in it unreadable (it owns them)."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                if not os.path.islink(folder := os.path.join(root, name)):
                    os.chmod(folder, 0o700)
        shutil.rmtree(path, ignore_errors=True)
