import subprocess
import sys

import zotune
from zotune.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == f"zotune {zotune.__version__}"
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_prints_the_loss_falling(capsys):
    assert main(["demo", "--steps", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, last = lines[-1].split()[1], lines[-1].split()[3]
    assert lines[-1].startswith("loss ") and float(last) < float(first)


def test_bad_demo_argument_is_one_line_and_exit_2(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zotune demo: error: steps must be >= 1, got 0"]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "zotune.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and zotune.__version__ in out.stdout
