"""Running a command-line entry point in-process as a user would, and checking its errors."""
import pytest

from aigc_fast.training.cli import run_main


def run_cli(main, argv, capsys, prog):
    """``main`` through run_main with ``argv``: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv, prog=prog)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(status, err, *fragments):
    """Bad input: exit status 2 and one line on stderr, no traceback, naming every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), lines[0]
