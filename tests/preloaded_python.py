"""`python train.py ...` for the tests without paying Python's imports of torch and Lightning each time.

Each train.py, eval.py or benchmark process a test starts spends about 4 s of CPU importing torch,
Lightning (which imports torchmetrics, torchvision, torch._dynamo and scipy) and Hydra before it reads its
first argument; the suite starts about a hundred of them. So each pytest process starts one server
(`python tests/preloaded_python.py <socket>`) that imports those libraries once, then forks a child per
command: the child takes the command's argv, working folder, environment and standard streams, and runs the
script as `__main__`, as `python script args` would; it exits with the script's status, its uncaught
exception printed by Python itself, through the interpreter's normal shutdown (atexit, threads).

What differs from a fresh process: the third-party modules above were imported before the command's
environment was set. So the server starts with PATH and only what is read at start, taken from the pytest
process's environment (`use_environment`), and a command whose environment differs from it in anything read
when an interpreter, torch, Lightning or fsspec starts
(thread counts, Python's own settings such as PYTHONPATH and the hash seed, locale, time zone, temp folder,
CUDA, torch and distributed-rank variables: `read_at_start`) runs as a real process instead. The child takes
the caller's umask, re-seeds numpy's global generator (Python's own `random` re-seeds after a fork by
itself) and forgets the temp folder and time zone it inherited; the hash seed is the server's for every
command (no code here depends on set order; a fresh process would draw its own). None of the project's own
modules is imported in the server, so everything the project does runs fresh in each child. Tests that
signal or kill a process, or run processes side by side, start real ones (subprocess.Popen);
`CIFAR_SPEEDRUN_TEST_PRELOAD=0` makes every command a real process too, and so does a machine with CUDA
(a CUDA context does not survive a fork) or another system than Linux.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Imported once by the server: the libraries every command imports first (nothing of the project).
PRELOAD = ("numpy", "torch", "lightning", "lightning.pytorch", "hydra", "omegaconf", "pydantic", "fsspec", "yaml")
_MESSAGE_BYTES = 1 << 20  # one request: argv, folder and environment, as JSON
# What an interpreter, torch, its thread pools, Lightning (its rank, at import) or fsspec read when they start.
# Not PL_GLOBAL_SEED and the like: Lightning writes those into the pytest process's environment while it runs
# and reads them at run time, where a command reads its own environment anyway.
_READ_AT_START = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "NPY_", "NUMPY_", "TORCH", "PYTORCH",
                  "CUDA", "NVIDIA", "LC_", "LANG", "TMPDIR", "TZ", "HOME", "FSSPEC_", "RANK", "LOCAL_RANK",
                  "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "SLURM_", "JSM_NAMESPACE_")
# torch writes these into the pytest process's environment as it runs, and reads them when used, not at import.
_WRITTEN_BY_TORCH = ("PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR")


def _linux_without_cuda() -> bool:
    if sys.platform != "linux":  # fork after importing torch, fds over a Unix socket
        return False
    import torch

    return not torch.cuda.is_available()


AVAILABLE = _linux_without_cuda()


def read_at_start(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` read when a process starts (stdio buffering aside: the server's is unbuffered,
    and a command's output is read once it has exited)."""
    return {key: value for key, value in env.items()
            if key.startswith(_READ_AT_START) and key != "PYTHONUNBUFFERED" and key not in _WRITTEN_BY_TORCH}


# ---------------------------------------------------------------- the server (runs as __main__)

def _serve(address: str) -> None:
    import importlib

    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for pytest and the commands, not the server
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the preloaded objects live for good: a child's collections skip them and leave their pages shared
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(8)
    listener.settimeout(1.0)
    print("ready", flush=True)
    while os.getppid() == parent:  # ends with the pytest process that started it
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        connection.settimeout(30)  # a client that connected and never sent its request is dropped
        try:
            message, fds, _, _ = socket.recv_fds(connection, _MESSAGE_BYTES, 3)
        except OSError:
            connection.close()
            continue
        if len(fds) != 3 or not message:
            for fd in fds:
                os.close(fd)
            connection.close()
            continue
        pid = os.fork()
        if pid == 0:  # the child becomes the command; nothing of the server's loop runs in it again
            listener.close()
            connection.close()
            _become(json.loads(message), fds)
            return
        for fd in fds:
            os.close(fd)
        _wait_for(pid, connection)


def _wait_for(pid: int, connection: socket.socket) -> None:
    """Report the child's pid, then its exit status. A client that says "kill" (its timeout) or goes away
    (interrupted, killed) has the child killed here, by its parent, before it is reaped: the pid cannot
    have been reused by then."""
    connection.settimeout(0.05)
    with contextlib.suppress(OSError):
        connection.send(json.dumps({"pid": pid}).encode())
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        try:
            word = connection.recv(64)
        except TimeoutError:
            continue
        except OSError:
            word = b""
        if word in (b"kill", b""):  # the client's timeout, or the client is gone
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
    with contextlib.suppress(OSError):
        connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
    connection.close()


def _become(request: dict[str, Any], fds: list[int]) -> None:
    """Turn this forked child into `python argv...` in the request's folder, environment and streams."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh interpreter starts with
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from TMPDIR when asked
    time.tzset()
    import numpy

    numpy.random.seed()  # from the OS, as a fresh import seeds it
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
    else:  # python script args: sys.path[0] is the script's folder, argv[0] the path as given
        if not os.path.exists(argv[0]):
            print(f"{sys.executable}: can't open file {os.path.abspath(argv[0])!r}: [Errno 2] No such file or "
                  "directory", file=sys.stderr)
            raise SystemExit(2)
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


# ---------------------------------------------------------------- the client (in the pytest process)

class PreloadedPython:
    """Runs `[sys.executable, *argv]` through the server this process started (started on first use).
    One command at a time: a second caller waits, and its timeout counts from when it called."""

    def __init__(self) -> None:
        self._server: subprocess.Popen[str] | None = None
        self._address = ""
        self._env: dict[str, str] | None = None
        self._starting = threading.Lock()
        self._running = threading.Lock()

    def use_environment(self, env: dict[str, str]) -> None:
        """The environment the server starts in (what is read at start, and PATH): the pytest process's, set
        once it is final, so that a test that changed os.environ when it ran the first command does not
        decide it for the rest."""
        self._env = {**read_at_start(env), "PATH": env.get("PATH", os.defpath), "PYTHONUNBUFFERED": "1"}

    def _start(self) -> None:
        self.close()
        if self._env is None:
            self.use_environment(dict(os.environ))
        assert self._env is not None
        folder = tempfile.mkdtemp(prefix="preloaded-python-")
        self._address = str(Path(folder) / "socket")
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
            self._address = ""

    def serves(self, command: list[str], env: dict[str, str]) -> bool:
        """This Python's command, in an environment that agrees with the server's in what is read at start."""
        if not AVAILABLE or command[0] != sys.executable:
            return False
        with self._starting:
            if self._server is None or self._server.poll() is not None:
                self._start()
        assert self._env is not None
        return read_at_start(env) == read_at_start(self._env)

    def run(self, command: list[str], *, cwd: str | os.PathLike[str], env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess[str]:
        """What `subprocess.run(command, cwd=, env=, capture_output=True, text=True, timeout=)` returns or raises."""
        deadline = time.monotonic() + timeout
        command = [os.fspath(part) for part in command]
        if not self.serves(command, env):
            raise ValueError(f"{command[0]} in this environment runs as a real process, not a preloaded one")
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps({"argv": command[1:], "cwd": os.fspath(cwd), "env": dict(env), "umask": umask}).encode()
        if not self._running.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise subprocess.TimeoutExpired(command, timeout)
        try:
            return self._run(command, request, deadline, timeout)
        finally:
            self._running.release()

    def _run(self, command: list[str], request: bytes, deadline: float,
             timeout: float) -> subprocess.CompletedProcess[str]:
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        outputs = {out_read: bytearray(), err_read: bytearray()}
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
            try:
                connection.connect(self._address)
                socket.send_fds(connection, [request], [null, out_write, err_write])
            except BaseException:
                for fd in (out_read, err_read):
                    os.close(fd)
                raise
            finally:
                for fd in (null, out_write, err_write):
                    os.close(fd)
            try:  # any exception here (KeyboardInterrupt included) closes the connection: the server kills it
                returncode = _read_until_exit(connection, outputs, deadline)
            finally:
                for fd in outputs:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            stdout, stderr = (_text(bytes(outputs[fd])) for fd in (out_read, err_read))
            if returncode is None:  # past the timeout: killed, as subprocess.run kills it, and said the same way
                with contextlib.suppress(OSError):
                    connection.send(b"kill")
                raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def _text(data: bytes) -> str:
    """Bytes as subprocess.run(text=True) gives them: the locale's encoding, universal newlines."""
    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()


def _read_until_exit(connection: socket.socket, outputs: dict[int, bytearray], deadline: float) -> int | None:
    """Both streams to their end and the exit status, or None at the deadline."""
    selector = selectors.DefaultSelector()
    for fd in outputs:
        selector.register(fd, selectors.EVENT_READ)
    selector.register(connection, selectors.EVENT_READ)
    returncode: int | None = None
    try:
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for key, _ in selector.select(left):
                if key.fileobj is connection:
                    message = connection.recv(_MESSAGE_BYTES)
                    if not message:
                        raise RuntimeError("the preloaded Python server ended while a command ran")
                    reply = json.loads(message)
                    if "returncode" in reply:
                        returncode = reply["returncode"]
                        selector.unregister(connection)
                    continue
                chunk = os.read(key.fd, 65536)
                if chunk:
                    outputs[key.fd] += chunk
                else:
                    selector.unregister(key.fd)
    finally:
        selector.close()
    return returncode


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
