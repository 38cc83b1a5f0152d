"""The preloaded Python the tests start train.py and eval.py through does what a fresh `python` does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import preloaded_python
import pytest

pytestmark = pytest.mark.skipif(not preloaded_python.AVAILABLE, reason="commands run as real processes here")

PROBE = """\
import json, os, sys
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "name": __name__,
                  "marker": os.environ.get("PROBE_MARKER"), "stdin": sys.stdin.read(),
                  "project_loaded": any(name.startswith("cifar_speedrun") for name in sys.modules)}))
print("to stderr", file=sys.stderr)
print("carriage\\rreturns\\r\\n", end="")  # subprocess.run(text=True) turns both into newlines
print(oct(os.umask(0)))
code = sys.argv[1]
if code == "raise":
    raise ValueError("raised by the probe")
sys.exit(int(code))
"""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _both(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The command in a fresh process and through this worker's preloaded server (the one run_train uses)."""
    fresh = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    assert preloaded_python.CLIENT.serves(command, env)
    return fresh, preloaded_python.CLIENT.run(command, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("code", ["0", "2", "raise"])
def test_a_script_sees_what_a_fresh_python_gives_it(tmp_path: Path, code: str) -> None:
    script = tmp_path / "scripts" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PROBE_MARKER": "set for this command"}
    fresh, preloaded = _both([sys.executable, str(script), code], work, env)
    assert preloaded.returncode == fresh.returncode == {"0": 0, "2": 2, "raise": 1}[code]
    assert preloaded.stdout == fresh.stdout  # argv, sys.path[0], folder, __main__, environment, empty stdin
    assert '"project_loaded": false' in preloaded.stdout  # the project's modules are imported fresh by each command
    assert preloaded.stderr.startswith("to stderr\n")
    assert "carriage\nreturns\n" in preloaded.stdout and oct(_umask()) in preloaded.stdout
    if code == "raise":  # Python's own report of an uncaught exception, ending as a fresh process's does
        assert fresh.stderr.splitlines()[-1] == preloaded.stderr.splitlines()[-1] == "ValueError: raised by the probe"


@pytest.mark.parametrize("how", ["-m", "-c"])
def test_a_module_and_a_code_string_run_as_python_m_and_c_do(tmp_path: Path, how: str) -> None:
    (tmp_path / "probe_module.py").write_text(PROBE)  # found on sys.path[0]: the working folder for -m and -c
    code = "import probe_module" if how == "-c" else "probe_module"
    fresh, preloaded = _both([sys.executable, how, code, "2"], tmp_path, dict(os.environ))
    assert preloaded.returncode == fresh.returncode and preloaded.stdout == fresh.stdout
    assert preloaded.stderr == fresh.stderr == "to stderr\n"


def test_what_is_read_at_start_sends_a_command_to_a_real_process(tmp_path: Path) -> None:
    client, command = preloaded_python.CLIENT, [sys.executable, "-c", "pass"]
    assert client.serves(command, dict(os.environ))
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    for key, value in (("OMP_NUM_THREADS", str(int(threads) + 1)), ("PYTHONPATH", str(tmp_path)),
                       ("PYTHONHASHSEED", "7"), ("LOCAL_RANK", "1"), ("TMPDIR", str(tmp_path)), ("TZ", "Asia/Tokyo")):
        assert not client.serves(command, {**os.environ, key: value}), key
    assert not client.serves(["/bin/true"], dict(os.environ))
    with pytest.raises(ValueError, match="runs as a real process"):
        client.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)


def test_a_command_past_its_timeout_is_killed_and_says_so(tmp_path: Path) -> None:
    script = tmp_path / "sleeps.py"
    script.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\n"
                      "print('started', flush=True)\ntime.sleep(60)\n")
    client = preloaded_python.CLIENT
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        client.run([sys.executable, str(script), str(tmp_path / "pid")], cwd=tmp_path, env=dict(os.environ), timeout=3)
    assert timed_out.value.output == "started\n", "what it wrote comes with the error, as from subprocess.run"
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped by the server, its parent
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
    again = client.run([sys.executable, "-c", "print('next')"], cwd=tmp_path, env=dict(os.environ), timeout=60)
    assert (again.returncode, again.stdout) == (0, "next\n")  # the server serves the next command


def test_a_missing_script_is_one_line_and_exit_2_as_from_python(tmp_path: Path) -> None:
    fresh, preloaded = _both([sys.executable, "no-such-script.py"], tmp_path, dict(os.environ))
    assert (preloaded.returncode, preloaded.stdout, preloaded.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert preloaded.returncode == 2
