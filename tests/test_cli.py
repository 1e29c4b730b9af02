"""The command line: `ui` stops everything it started; what it starts runs on its interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_the_ui_command_stops_the_server_and_its_workers(tmp_path):
    """What `python -m pipeline ui` runs the MLflow server with: killed with SIGTERM, the
    command takes the server's whole process group (a worker included) down with it."""
    pids = tmp_path / "pids"
    script = (f"from pipeline.cli import _run_group; import sys; sys.exit(_run_group(['sh', '-c', "
              f"'sleep 300 & echo $$ $! > {pids}; wait']))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.time() < deadline:
        time.sleep(0.1)
    server, worker = map(int, pids.read_text().split())
    assert _alive(server) and _alive(worker)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while (_alive(server) or _alive(worker)) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(server) and not _alive(worker)


def test_the_stages_run_on_the_interpreter_of_the_command(tmp_path):
    """`.venv/bin/python -m pipeline …` from a shell whose PATH finds another `python` first:
    what the CLI starts (DVC, whose stage commands say `python`) finds this interpreter."""
    import shutil
    import subprocess
    import sys

    other = tmp_path / "other-bin"
    other.mkdir()
    (other / "python").write_text("#!/bin/sh\necho not-this-one\n")
    (other / "python").chmod(0o755)
    code = ("import shutil, sys\nfrom pipeline.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('PYTHON=' + shutil.which('python'))\n")
    env = {**os.environ, "PATH": f"{other}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    found = out.rsplit("PYTHON=", 1)[1].strip()
    assert os.path.dirname(found) == os.path.dirname(sys.executable), found
    assert shutil.which("python", path=env["PATH"]) == str(other / "python")  # the test's premise
