"""The child side of `gptoss.tools.python_sandbox`, run as `python -I -S sandbox_worker.py CONFIG`.

Only the standard library, and nothing from gptoss: the interpreter starts isolated (-I: no environment
variables, no user site, no script folder on sys.path) and without site-packages (-S).

Three processes, one job each:

- the launcher (the process the server starts, still with the server's privileges) enters a new network
  namespace and a new PID namespace (unless the server is the machine's root, inside a new user
  namespace, which grants the right to make them), starts init, and then only waits: until the server
  closes the launcher's stdin (the lifeline: the server asks it to stop, or the server is gone) or until
  init ends. Then it kills init, which makes the kernel kill every other process of the namespace, and
  reaps it. So once the launcher has exited, nothing of the sandbox is left, however the code forked or
  detached;
- init, PID 1 of the new namespace, sets the resource limits, gives up every privilege, starts the
  interpreter and reaps the processes orphaned under it; when the interpreter ends, init reports how
  and exits, which ends the sandbox;
- the interpreter reads cells from the command pipe, runs each in one persistent namespace with fds 1
  and 2 and sys.stdout/sys.stderr writing to the output pipe (the server reads it while the cell runs),
  and reports that it is done on the reply pipe.

Cells come as frames: a 4-byte big-endian length, then that much UTF-8. Messages to the server are
frames of JSON, each written at once (well under PIPE_BUF, so never interleaved): {"ready": true} when
the interpreter waits for its first cell, {"done": true} after each cell, {"error": why} when the
sandbox cannot be set up, {"exit": wait status} from init when the interpreter has ended.
"""

import ast
import ctypes
import io
import itertools
import json
import linecache
import os
import resource
import select
import signal
import struct
import sys
import traceback
import types

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522

libc = ctypes.CDLL(None, use_errno=True)


def main():
    config = json.loads(sys.argv[1])
    commands, replies = config["command_fd"], config["reply_fd"]
    for fd in (commands, replies):
        os.set_inheritable(fd, False)  # programs the code starts must not hold them
    try:
        enter_namespaces(config["user"] is None)
    except OSError as exc:
        send(replies, {"error": exc.strerror})
        sys.exit(1)
    init = os.fork()
    if init == 0:
        try:
            run_init(config, commands, replies)
        finally:
            os._exit(1)  # whatever happened, the copy must not go on as the launcher
    try:
        os.close(commands)
        os.close(replies)
        select.select([0, os.pidfd_open(init)], [], [])
    finally:  # whatever ended the wait, the sandbox ends with the launcher
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)


def enter_namespaces(in_user_namespace):
    """New network and PID namespaces (the PID namespace is for the children made from now on), inside a
    new user namespace too unless the server runs as the machine's root and so may make them itself."""
    flags = CLONE_NEWNET | CLONE_NEWPID
    if not in_user_namespace:
        try:
            check(libc.unshare(flags), "unshare(CLONE_NEWNET | CLONE_NEWPID)")
        except OSError as exc:  # root, but without CAP_SYS_ADMIN or under docker's default seccomp profile
            raise OSError(exc.errno, f"{exc.strerror} (in a container, that needs CAP_SYS_ADMIN and a seccomp "
                          "profile that allows unshare)")
        return
    uid, gid = os.getuid(), os.getgid()
    try:
        check(libc.unshare(CLONE_NEWUSER | flags), "unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)")
    except OSError as exc:
        raise OSError(exc.errno, "network isolation needs an unprivileged user namespace, which this machine "
                      f"forbids ({exc.strerror}; see the sysctls user.max_user_namespaces, "
                      "kernel.unprivileged_userns_clone and kernel.apparmor_restrict_unprivileged_userns)")
    # The same uid and gid inside as outside. Writing "deny" first is what lets a normal user map its gid.
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
        except OSError as exc:
            raise OSError(exc.errno, f"writing /proc/self/{name} of the new user namespace: {exc.strerror}")


def run_init(config, commands, replies):
    """PID 1 of the sandbox: sets it up, starts the interpreter, reaps, and reports the interpreter's end."""
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # not the lifeline: the code reads nothing, and input() gets EOF at once
        os.close(devnull)
        library = open_library()
        for name, limits in config["rlimits"].items():
            resource.setrlimit(getattr(resource, name), tuple(limits))
        drop_privileges(config["user"])
        reach_library(library)
        interpreter = os.fork()
    except (OSError, ValueError) as exc:
        send(replies, {"error": f"the sandbox could not be set up: {exc}"})
        os._exit(1)
    if interpreter == 0:
        os._exit(serve(commands, replies))
    os.close(commands)
    while True:
        pid, status = os.wait()
        if pid == interpreter:
            send(replies, {"exit": status})
            os._exit(0)


def open_library():
    """Descriptors of the folders on sys.path, opened while the process may still enter them all."""
    return {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in sys.path if os.path.isdir(path)}


def reach_library(library):
    """Leads the imports to the folders of sys.path the sandbox's user can no longer enter by name.

    A server running as root often has its interpreter where only root may look (/root/.pyenv, a venv in
    a home folder); the sandbox's user would then fail every import. /proc/self/fd/N leads into the
    folder opened before, past the parents it cannot enter, and only there. The packages imported
    already (encodings looks up codecs lazily) and the loaders that tracebacks read source through are
    led there too.
    """
    moved = {}
    for path, fd in library.items():
        if os.access(path, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            moved[path] = f"/proc/self/fd/{fd}"

    def reach(path):
        for old in sorted(moved, key=len, reverse=True):  # lib-dynload is a folder of its own in the stdlib's
            if path == old or path.startswith(old + os.sep):
                return moved[old] + path[len(old):]
        return path

    sys.path[:] = map(reach, sys.path)
    for module in list(sys.modules.values()):
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = map(reach, module.__path__)
        loader = getattr(module, "__loader__", None)
        if isinstance(getattr(loader, "path", None), str):
            loader.path = reach(loader.path)


def drop_privileges(user):
    """No capabilities, and none to gain through a setuid program; as root, also a uid and gid of its own."""
    if user is not None:
        uid, gid = user
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
    else:  # the new user namespace gave every capability within it
        header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def check(result, call):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")


def serve(commands, replies):
    """The interpreter: one cell per command frame, until the server closes the pipe."""
    output = os.dup(1)  # the output pipe, to give fds 1 and 2 back to each cell whatever the last did
    main_module = types.ModuleType("__main__")  # the cells' namespace, where pickle looks for their classes
    sys.modules["__main__"] = main_module
    me = os.getpid()
    send(replies, {"ready": True})
    for number in itertools.count(1):
        source = receive(commands)
        if source is None:
            return 0
        os.dup2(output, 1)
        os.dup2(output, 2)
        sys.stdout, sys.stderr = text_stream(1), text_stream(2)
        failed = run_cell(source, f"<cell {number}>", main_module.__dict__, output)
        if os.getpid() != me:
            # A process the cell forked got to the end of the cell: it must not serve as a second interpreter.
            os._exit(int(failed))
        send(replies, {"done": True})


def text_stream(fd):
    """Unbuffered, like `python -u`: what the code prints reaches the pipe in the order it is printed."""
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", write_through=True)


def run_cell(source, filename, namespace, output):
    """Runs a cell as Jupyter does (the repr of a final expression is shown); True if it raised."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks quote it
    try:
        tree = ast.parse(source, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        body = compile(tree, filename, "exec")
        result = None if last is None else compile(ast.Expression(last.value), filename, "eval")
    except (SyntaxError, ValueError) as exc:  # the cell did not run: no traceback, the error alone
        write(output, "".join(traceback.format_exception_only(type(exc), exc)))
        return True
    try:
        exec(body, namespace)
        if result is not None:
            value = eval(result, namespace)
            if value is not None:
                write(output, repr(value) + "\n")
    except BaseException as exc:  # whatever the code raises is the code's output, SystemExit too
        write(output, format_error(exc))
        return True
    return False


def format_error(exc):
    """The traceback as Python prints it, from the cell on: the frames of this file are not the code's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def write(fd, text):
    data = text.encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(fd, data):]


def send(fd, message):
    data = json.dumps(message).encode()
    os.write(fd, struct.pack(">I", len(data)) + data)


def receive(fd):
    """The next cell, or None once the server has closed the pipe."""
    header = read_exactly(fd, 4)
    if header is None:
        return None
    body = read_exactly(fd, struct.unpack(">I", header)[0])
    return None if body is None else body.decode("utf-8", "surrogatepass")


def read_exactly(fd, size):
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


if __name__ == "__main__":
    main()
