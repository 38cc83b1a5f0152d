"""`python train.py ...` for the tests without paying Python's imports of torch and Lightning each time.

Each train.py, eval.py or benchmark process a test starts spends about 4 s of CPU importing torch,
Lightning (which imports torchmetrics, torchvision, torch._dynamo and scipy) and Hydra before it reads its
first argument; the suite starts about a hundred of them. So each pytest process starts one server
(`python tests/preloaded_python.py <socket>`) that imports those libraries once, then forks a child per
command: the child takes the command's argv, working folder, environment and standard streams, and runs the
script as `__main__`, as `python script args` would; it exits with the script's status, its uncaught
exception printed by Python itself, through the interpreter's normal shutdown (atexit, threads).

What differs from a fresh process: the third-party modules above were imported before the command's
environment was set. So a command whose environment differs from the server's in what is read at start
(thread counts, Python's own settings such as PYTHONPATH and the hash seed, locale, CUDA and torch variables:
`read_at_start`) runs as a real process instead. None of the project's own modules is imported in the
server, so everything the project does runs fresh in each child. Tests that signal or kill a process, or
run processes side by side, start real ones (subprocess.Popen); `CIFAR_SPEEDRUN_TEST_PRELOAD=0` makes every
command a real process too.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Imported once by the server: the libraries every command imports first (nothing of the project).
PRELOAD = ("numpy", "torch", "lightning", "lightning.pytorch", "hydra", "omegaconf", "pydantic", "fsspec", "yaml")
AVAILABLE = sys.platform == "linux"  # fork after importing torch, fds over a Unix socket, PR_SET_PDEATHSIG
_MESSAGE_BYTES = 1 << 20  # one request: argv, folder and environment, as JSON
_READ_AT_START = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "CUDA", "NVIDIA", "LC_", "LANG")


def read_at_start(env: dict[str, str]) -> dict[str, str]:
    """The variables an interpreter, torch or its thread pools read when they start (stdio buffering aside:
    the server's is unbuffered, and a command's output is read once it has exited)."""
    return {key: value for key, value in env.items()
            if key.startswith(_READ_AT_START) and key != "PYTHONUNBUFFERED"}


# ---------------------------------------------------------------- the server (runs as __main__)

def _serve(address: str) -> None:
    import ctypes
    import importlib

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux): end with the pytest process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for pytest and the commands, not the server
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(8)
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(connection, _MESSAGE_BYTES, 3)
        pid = os.fork()
        if pid == 0:  # the child becomes the command; nothing of the server's loop runs in it again
            listener.close()
            connection.close()
            _become(json.loads(message), fds)
            return
        for fd in fds:
            os.close(fd)
        try:
            connection.send(json.dumps({"pid": pid}).encode())
            _, status = os.waitpid(pid, 0)
            connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
        except OSError:  # the client went away (a test's timeout killed the child): serve the next one
            pass
        finally:
            connection.close()


def _become(request: dict[str, Any], fds: list[int]) -> None:
    """Turn this forked child into `python argv...` in the request's folder, environment and streams."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh interpreter starts with
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    import runpy

    if argv[0] == "-c":  # python -c code args: sys.path[0] is '' (the working folder), argv[0] is '-c'
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        import types

        main = sys.modules["__main__"] = types.ModuleType("__main__")  # the server's own stays with its frames
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    elif argv[0] == "-m":  # python -m module args: sys.path[0] is the working folder, argv[0] the module's file
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:  # python script args: sys.path[0] is the script's folder
        script = os.path.abspath(argv[0])
        sys.argv = [argv[0], *argv[1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------- the client (in the pytest process)

class PreloadedPython:
    """Runs `[sys.executable, *argv]` through the server this process started (started on first use)."""

    def __init__(self) -> None:
        self._server: subprocess.Popen[str] | None = None
        self._address = ""
        self._env: dict[str, str] = {}

    def _start(self) -> None:
        folder = tempfile.mkdtemp(prefix="preloaded-python-")
        self._address = str(Path(folder) / "socket")
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._server = subprocess.Popen([sys.executable, __file__, self._address], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, env=self._env, text=True)
        if self._server.stdout is None or self._server.stdout.readline().strip() != "ready":
            raise RuntimeError("the preloaded Python server did not start")
        atexit.register(self.close)

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.kill()
            self._server.wait()
        self._server = None
        if self._address:
            shutil.rmtree(Path(self._address).parent, ignore_errors=True)

    def serves(self, command: list[str], env: dict[str, str]) -> bool:
        """This Python's command, in an environment that agrees with the server's in what is read at start
        (on Linux: elsewhere forking after torch's import is not safe, and every command is a real process)."""
        if not AVAILABLE:
            return False
        if self._server is None or self._server.poll() is not None:
            self._start()
        return command[0] == sys.executable and read_at_start(env) == read_at_start(self._env)

    def run(self, command: list[str], *, cwd: str | os.PathLike[str], env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess[str]:
        """What `subprocess.run(command, cwd=, env=, capture_output=True, text=True, timeout=)` returns."""
        if not self.serves(command, env):
            raise ValueError(f"{command[0]} in this environment runs as a real process, not a preloaded one")
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            connection.connect(self._address)
            request = {"argv": command[1:], "cwd": os.fspath(cwd), "env": dict(env)}
            socket.send_fds(connection, [json.dumps(request).encode()], [null, out_write, err_write])
        finally:
            for fd in (null, out_write, err_write):
                os.close(fd)
        pid = json.loads(connection.recv(_MESSAGE_BYTES))["pid"]
        deadline = time.monotonic() + timeout
        streams = _read_until_exit(connection, {out_read: bytearray(), err_read: bytearray()}, deadline)
        if streams is None:  # past the timeout: kill it as subprocess.run does, and say so the same way
            os.kill(pid, signal.SIGKILL)
            connection.close()
            raise subprocess.TimeoutExpired(command, timeout)
        outputs, returncode = streams
        connection.close()
        return subprocess.CompletedProcess(command, returncode, outputs[out_read].decode(errors="replace"),
                                           outputs[err_read].decode(errors="replace"))


def _read_until_exit(connection: socket.socket, outputs: dict[int, bytearray],
                     deadline: float) -> tuple[dict[int, bytearray], int] | None:
    """Both streams to their end and the exit status, or None at the deadline."""
    selector = selectors.DefaultSelector()
    for fd in outputs:
        selector.register(fd, selectors.EVENT_READ)
    selector.register(connection, selectors.EVENT_READ)
    returncode: int | None = None
    try:
        while len(selector.get_map()) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for key, _ in selector.select(left):
                if key.fileobj is connection:
                    returncode = json.loads(connection.recv(_MESSAGE_BYTES) or b'{"returncode": -9}')["returncode"]
                    selector.unregister(connection)
                    continue
                chunk = os.read(key.fd, 65536)
                if chunk:
                    outputs[key.fd] += chunk
                else:
                    selector.unregister(key.fd)
                    os.close(key.fd)
    finally:
        for key in list(selector.get_map().values()):
            if key.fileobj is not connection:
                os.close(key.fd)
        selector.close()
    assert returncode is not None
    return outputs, returncode


CLIENT = PreloadedPython()  # this process's server, started by its first command


def run(command: list[str], *, cwd: str | os.PathLike[str], env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(command, capture_output=True, text=True)`, through the preloaded server unless
    CIFAR_SPEEDRUN_TEST_PRELOAD=0."""
    env = dict(os.environ if env is None else env)
    if os.environ.get("CIFAR_SPEEDRUN_TEST_PRELOAD", "1") == "0" or not CLIENT.serves(command, env):
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return CLIENT.run(command, cwd=cwd, env=env, timeout=timeout)


if __name__ == "__main__":
    _serve(sys.argv[1])
