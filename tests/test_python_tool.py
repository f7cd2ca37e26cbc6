"""The `python` tool's sandbox: a stateful interpreter whose code reaches no network, cannot outgrow its limits
or outlive its sandbox, and sees none of the server's secrets.

Every test starts real sandboxes; they are skipped only where the machine cannot run one (with the reason
sandbox_unavailable() gives). Processes are found by the sandbox's PID namespace, which the code reports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gptoss.tools.python_sandbox import (PythonSandbox, PythonSessions, SandboxLimits, _is_machine_root,
                                         sandbox_unavailable)

LIMITS = SandboxLimits(timeout_s=5, cpu_s=20, memory_bytes=256 << 20, max_processes=16, output_bytes=2000,
                       file_bytes=1 << 20)


@pytest.fixture(autouse=True)
def _needs_a_sandbox():
    if (reason := sandbox_unavailable()) is not None:
        pytest.skip(reason)


@pytest.fixture
def sandbox():
    with PythonSandbox(LIMITS) as box:
        yield box


def pid_namespace(box: PythonSandbox) -> str:
    """The sandbox's PID namespace, as /proc names it; it has processes now (init and the interpreter)."""
    namespace = box.run("import os; print(os.readlink('/proc/self/ns/pid'), end='')")
    assert namespace.startswith("pid:[") and len(processes_in(namespace)) == 2
    return namespace


def processes_in(namespace: str) -> dict[int, str]:
    """The processes of a PID namespace, by pid, with their state ("Z" for a zombie)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                    found[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # it ended meanwhile
                pass
    return found


def test_state_output_and_tracebacks(sandbox):
    assert sandbox.run("x = 41") == "(no output)"
    assert sandbox.run("x + 1") == "42\n"
    assert sandbox.run("print('a')\nimport sys\nprint('b', file=sys.stderr)\nprint('c')") == "a\nb\nc\n"
    assert sandbox.run("import os\nos.system('echo from a shell')") == "from a shell\n0\n"  # fd 1, then the repr

    out = sandbox.run("def f():\n    return 1 / 0\nf()")
    assert out.startswith("Traceback (most recent call last):\n")
    assert 'File "<cell 5>", line 2, in f\n    return 1 / 0' in out
    assert out.endswith("ZeroDivisionError: division by zero\n")
    assert "sandbox_worker" not in out

    out = sandbox.run("def g(:")
    assert "SyntaxError: invalid syntax" in out and "Traceback" not in out
    assert sandbox.run("x") == "41\n"


def test_the_code_reaches_no_network(sandbox):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # the test itself does reach it
            listener.accept()[0].close()
        out = sandbox.run(f"""
import socket
def attempt(what, connect):
    try:
        connect()
        print(what, "reached")
    except OSError as exc:
        print(what, "failed:", type(exc).__name__)
attempt("public", lambda: socket.create_connection(("1.1.1.1", 80), timeout=2))
attempt("server", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
print(socket.if_nameindex())
""")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert "reached" not in out
    assert "public failed: OSError" in out and "server failed: OSError" in out and "dns failed: gaierror" in out
    assert "[(1, 'lo')]" in out


def test_an_endless_loop_is_stopped_at_the_timeout():
    with PythonSandbox(replace(LIMITS, timeout_s=2)) as box:
        box.run("x = 1")
        start = time.monotonic()
        out = box.run("print('started')\nwhile True: pass")
        assert 2 <= time.monotonic() - start < 2 + 3
        assert out.startswith("started\n")
        assert out.endswith("Execution timed out after 2 s, so the interpreter was stopped. "
                            "The interpreter's state is lost; the next run starts a fresh one.")
        assert "NameError: name 'x' is not defined" in box.run("x")
        assert box.run("1 + 1") == "2\n"


def test_the_cpu_limit_ends_the_interpreter():
    with PythonSandbox(replace(LIMITS, cpu_s=1)) as box:
        start = time.monotonic()
        out = box.run("while True: pass")
        assert time.monotonic() - start < 4
        assert f"killed by signal {signal.SIGXCPU:d} (CPU time limit exceeded): it used up its 1 s of CPU time" in out
        assert box.run("1 + 1") == "2\n"


def test_a_fork_bomb_is_contained():
    with PythonSandbox(replace(LIMITS, timeout_s=3)) as box:
        namespace = pid_namespace(box)
        start = time.monotonic()
        out = box.run("import os\nwhile True:\n    os.fork()")
        assert time.monotonic() - start < 3 + 3
        assert "BlockingIOError" in out or "timed out" in out
        # Nothing of the bomb runs on: once its last fork fails, only init and the interpreter live (the
        # zombies of the interpreter's children stay, as in any Python process, until the sandbox ends).
        deadline = time.monotonic() + 5
        while len(alive := [pid for pid, state in processes_in(namespace).items() if state != "Z"]) > 2:
            assert time.monotonic() < deadline, f"still running: {alive}"
            time.sleep(0.1)
        assert subprocess.run(["true"]).returncode == 0
        assert box.run("1 + 1").endswith("2\n")  # after what the bomb's last processes printed, if anything
    assert processes_in(namespace) == {}


def test_memory_is_limited(sandbox):
    sandbox.run("y = 5")
    assert "MemoryError" in sandbox.run("x = bytearray(4 << 30)")
    assert sandbox.run("y") == "5\n"


def test_output_is_cut_with_a_note(sandbox):
    out = sandbox.run("print('a' * 5000 + 'END')")
    assert out == "a" * 1000 + "\n[... 3004 bytes of output cut ...]\n" + "a" * 996 + "END\n"
    out = sandbox.run("import sys\nfor _ in range(40): sys.stdout.write('b' * (1 << 18))\nprint('last')")
    assert f"[... {40 * (1 << 18) + 5 - 2000} bytes of output cut ...]" in out and out.endswith("last\n")


def test_the_working_folder_and_close(sandbox):
    workdir = sandbox.workdir
    assert sandbox.run("import os\nprint(os.getcwd(), os.environ['HOME'])") == f"{workdir} {workdir}\n"
    assert sandbox.run("open('notes.txt', 'w').write('kept')") == "4\n"
    assert (workdir / "notes.txt").read_text() == "kept"
    assert sandbox.run("open('notes.txt').read()") == "'kept'\n"
    assert "File too large" in sandbox.run("open('big', 'wb').write(bytes(2 << 20))")

    namespace = pid_namespace(sandbox)
    sandbox.run("import subprocess\nsleeper = subprocess.Popen(['sleep', '60'], start_new_session=True)")
    assert len(processes_in(namespace)) == 3
    sandbox.close()
    assert not workdir.exists()
    assert processes_in(namespace) == {}
    sandbox.close()
    assert sandbox.run("1") == "This Python session was closed; its state is lost."


def test_what_the_code_does_to_its_interpreter(sandbox):
    out = sandbox.run("print('bye')\nimport os\nos._exit(3)")
    assert out.startswith("bye\nThe interpreter exited with status 3. The interpreter's state is lost")
    assert sandbox.run("1 + 1") == "2\n"
    assert "killed by signal 9 (Killed)" in sandbox.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    out = sandbox.run("import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\nprint('lost')")
    assert out.endswith("ValueError: I/O operation on closed file.\n")
    assert sandbox.run("print('back')") == "back\n"


def test_the_servers_environment_stays_outside(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-for-the-sandbox")
    with PythonSandbox(LIMITS) as box:
        assert box.run("import os\nsorted(os.environ)") == "['HOME', 'LANG', 'PATH', 'TMPDIR']\n"
        assert box.run("import sys\nsys.stdin.read()") == "''\n"


@pytest.mark.skipif(not _is_machine_root(), reason="not the machine's root: the sandbox runs as the server's user")
def test_as_root_each_sandbox_has_a_user_of_its_own(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("sk-test")
    secret.chmod(0o600)
    with PythonSandbox(LIMITS) as first, PythonSandbox(LIMITS) as second:
        uids = {int(box.run("import os\nprint(os.getuid())")) for box in (first, second)}
        assert len(uids) == 2 and 0 not in uids
        assert "PermissionError" in first.run(f"open({str(secret)!r}).read()")
        assert "PermissionError" in first.run(f"open('/proc/{os.getpid()}/environ').read()")
        assert "PermissionError" in first.run(f"import os\nos.listdir({str(second.workdir)!r})")
        assert "PermissionError" in first.run("os.setuid(0)")


def test_close_ends_a_run_in_progress(sandbox):
    results = []
    runner = threading.Thread(target=lambda: results.append(sandbox.run("import time\ntime.sleep(60)")))
    runner.start()
    time.sleep(0.3)
    start = time.monotonic()
    sandbox.close()
    runner.join(5)
    assert not runner.is_alive() and time.monotonic() - start < 2
    assert results == ["The Python session was closed during the run; its state is lost."]


def test_sessions_one_sandbox_per_key_and_the_least_recent_evicted():
    sessions = PythonSessions(LIMITS, max_sessions=2)
    try:
        a = sessions.get("a")
        a.run("x = 'a'")
        assert sessions.get("a") is a and a.run("x") == "'a'\n"
        b = sessions.get("b")
        assert b is not a and "NameError" in b.run("x")
        namespace = pid_namespace(a)
        c = sessions.get("c")  # a is the least recently used
        assert processes_in(namespace) == {} and not a.workdir.exists()
        assert a.run("x") == "This Python session was closed; its state is lost."
        assert sessions.get("b") is b
        sessions.close("b")
        assert not b.workdir.exists() and c.run("1") == "1\n"
    finally:
        sessions.close_all()
    assert not c.workdir.exists()


def test_idle_sessions_are_closed():
    sessions = PythonSessions(LIMITS, idle_s=0.2)
    try:
        a = sessions.get("a")
        namespace = pid_namespace(a)
        time.sleep(0.3)
        b = sessions.get("b")
        assert processes_in(namespace) == {} and not a.workdir.exists()
        assert b.run("1 + 1") == "2\n"
    finally:
        sessions.close_all()
    assert not b.workdir.exists()
