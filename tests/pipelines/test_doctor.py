"""`raydiff doctor`: each check against this machine's real Python, torch, Ray, sockets, disk and PATH."""

import socket
import stat

from pipelines.cli import main
from pipelines.doctor import PORTS, check_chromium, check_disk, check_port, check_python, check_ray, check_torch, pins
from tests.conftest import free_port


def test_versions_are_held_to_the_projects_own_pins():
    wanted = pins()
    assert wanted == {"python": "<3.13,>=3.11", "torch": "==2.13.0", "ray": "==2.60.*"}
    assert check_python("3.11.7", wanted["python"]).status == "ok"
    old = check_python("3.10.4", wanted["python"])
    assert old.status == "FAIL" and "3.11" in old.fix
    torch_check = check_torch(wanted["torch"])
    assert torch_check.status == "ok" and "torch 2.13.0" in torch_check.what and "CPU build" in torch_check.what
    wrong = check_torch("==2.5.0")
    assert wrong.status == "FAIL" and "torch==2.5.0" in wrong.what and "make run" in wrong.fix
    assert check_ray(wanted["ray"]).what.startswith("Ray 2.60")
    assert check_ray("==2.9.*").status == "FAIL"


def test_a_busy_port_is_reported_with_what_to_do():
    port = free_port()
    assert check_port(port, "the endpoint", "FAIL", "use another").status == "ok"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        busy = check_port(port, "the endpoint", "FAIL", "use another")
    assert (busy.status, busy.what, busy.fix) == ("FAIL", f"port {port} (the endpoint) is in use", "use another")
    assert PORTS[8000][1] == "FAIL" and "--set port=" in PORTS[8000][2]


def test_chromium_is_looked_up_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = check_chromium()
    assert missing.status == "warn" and "apt-get install -y chromium" in missing.fix
    browser = tmp_path / "chromium"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(browser.stat().st_mode | stat.S_IXUSR)
    found = check_chromium()
    assert found.status == "ok" and found.what.endswith(str(browser))


def test_the_command_prints_every_check_and_fails_only_on_a_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    disk = check_disk(tmp_path)
    assert disk.status in ("ok", "warn", "FAIL") and "GB free under" in disk.what
    code = main(["doctor"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "raydiff doctor" and len([line for line in lines if line.startswith("  ")]) >= 8
    for word in ("Python", "torch", "Ray", "port 8000", "port 8265", "port 5000", "GB free", "Chromium"):
        assert word in out, word
    failed = out.count("  FAIL ")
    assert code == int(failed > 0)
    assert lines[-1].startswith(f"{failed} to fix before a run" if failed else "ready to run")
