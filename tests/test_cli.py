"""The one entry point, `python -m pipeline`, and the container's lint."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from pipeline.__main__ import COMMANDS, main
from tests.conftest import PYTHON, ROOT, env_for_subprocess, run_pipeline


def test_help_lists_every_command():
    out = run_pipeline("--help", check=False, timeout=300)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    # in this process (the entry point's main): a fresh interpreter per command cost ~2.5 s each,
    # and `python -m pipeline` itself is run above and below
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0, capsys.readouterr().err
    assert "usage: python -m pipeline " + name in capsys.readouterr().out


def test_unknown_command_fails_clearly():
    out = run_pipeline("trian", check=False, timeout=300)
    assert out.returncode != 0
    assert "invalid choice: 'trian'" in out.stderr


def test_bad_override_is_a_clear_error_not_a_traceback():
    out = run_pipeline(
        "train", "--config", "configs/debug.yaml", "train.lrr=1", check=False, timeout=300
    )
    assert out.returncode == 2
    assert "unknown config key 'train.lrr'" in out.stderr and "Traceback" not in out.stderr


def test_a_rank_dying_in_native_code_leaves_its_python_stack(tmp_path):
    """SIGABRT (what a C++ std::terminate raises) mid-command: the log says where Python was."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "pipeline", "synth", "--out", str(tmp_path), "--n", "100000",
         "--resolution", "64"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env_for_subprocess(),
    )  # fmt: skip
    while not any(tmp_path.iterdir()):  # it is writing images
        assert proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGABRT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err and "pipeline/commands/synth.py" in err, err[-2000:]


def test_ctrl_c_inside_a_stage_ends_a_long_native_call_within_seconds(sigint_reaches_children):
    """Python sees SIGINT only between bytecodes: inside one long torch call (an eigensolve of
    ~10 s here) the entry point's watcher prints the stage's one line and exits 130 instead."""
    script = (
        "import torch; from pipeline import progress; progress.end_stuck_interrupts(); "
        "torch.set_num_threads(1); a = torch.randn(3000, 3000, dtype=torch.float64)\n"
        "with progress.stage('an eigensolve'): torch.linalg.eigh(a @ a.T); print('finished')"
    )
    proc = subprocess.Popen(
        [PYTHON, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=env_for_subprocess(),
    )  # fmt: skip
    assert proc.stderr.readline() == "an eigensolve ...\n"
    time.sleep(0.5)  # inside the eigensolve
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 5 and proc.returncode == 130, (out, err)
    assert err.strip() == "error: interrupted during an eigensolve; nothing was written", err
    assert not out


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_installs_the_same_pins():
    text = (ROOT / "Dockerfile").read_text()
    assert "requirements.lock" in text and "torch==2.13.0" in text
    assert "USER 1000" in text and 'ENTRYPOINT ["python", "-m", "pipeline"]' in text
