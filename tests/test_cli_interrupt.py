"""Ctrl-C ends every command with "visto: interrupted" and exit code 130 (128 + SIGINT), the
shell's convention, whatever the interrupt cut short: Python code, code run by exec() (CPython
then remembers the interrupt and used to kill the process with SIGINT at exit: the caller saw
-2 although visto caught it), or C code that replaced the KeyboardInterrupt by an error of its
own (torch loading a checkpoint: the chat used to say the checkpoint did not match)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `visto compare`'s run function replaced by one that is interrupted in the way named
SCRIPT = """
import os, signal, sys, time
import visto.commands.compare as compare
from visto.errors import UserError

def interrupted_in_exec(args):
    exec("raise KeyboardInterrupt")  # as dataclasses' exec'd methods are, during an import

def interrupted_in_c(args):  # as torch's C code does when a callback of it is interrupted
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    except KeyboardInterrupt:
        raise RuntimeError("could not determine the shape of object type 'UntypedStorage'") from None

def plain_error(args):
    raise UserError("no such checkpoint")

compare.run = {how}
import visto.cli
sys.exit(visto.cli.main(["compare"]))
"""


def sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(how: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # run as `python -m`, as the `visto` script runs: CPython's check at exit is on that path
    (tmp_path / "interrupt_probe.py").write_text(SCRIPT.format(how=how))
    path = [str(tmp_path), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    # Ctrl-C as a terminal delivers it: a shell runs a background job with SIGINT ignored,
    # which a child inherits (and then nothing interrupts it); the command starts with it back
    return subprocess.run([sys.executable, "-m", "interrupt_probe"], env=env, preexec_fn=sigint_default,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("how", ["interrupted_in_exec", "interrupted_in_c"])
def test_an_interrupted_command_exits_with_130_and_says_so(how, tmp_path) -> None:
    done = run(how, tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().endswith("visto: interrupted"), done.stderr
    assert "Traceback" not in done.stderr and "shape" not in done.stderr


def test_an_error_without_ctrl_c_is_still_the_error(tmp_path) -> None:
    done = run("plain_error", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "visto: error: no such checkpoint"
