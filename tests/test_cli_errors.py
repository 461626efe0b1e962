"""The CLI ends on an error a user can act on with its message alone (``-v`` adds the traceback), and leaves any
other error (a bug) its traceback."""
from click.testing import CliRunner

import flows.cli
from flows.cli import main


def test_a_user_error_is_one_line():
    result = CliRunner().invoke(main, ["show-config", "-c", "nope.yaml"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: config file nope.yaml not found"


def test_verbose_adds_the_traceback():
    result = CliRunner().invoke(main, ["-v", "show-config", "-c", "nope.yaml"])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ConfigError: config file nope.yaml not found" in result.output
    assert result.output.rstrip().endswith("Error: config file nope.yaml not found")


def test_a_missing_run_is_named(tmp_path):
    result = CliRunner().invoke(main, ["status", "missing", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"no run named 'missing' under {tmp_path}" in result.output


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*args):
        raise ValueError("a bug")

    monkeypatch.setattr(flows.cli, "load_config", broken)
    result = CliRunner().invoke(main, ["show-config"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_ui_on_a_busy_port_says_so():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 1 and f"port {port} on 127.0.0.1 is in use" in result.output
