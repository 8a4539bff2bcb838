"""`raydiff doctor`: does this machine have what a run and the tests need, and if not, what to do about it.

Each check gives ok, warn (a run works, something is off) or FAIL (a run or the tests will not work); the versions
are checked against the project's own pins (the installed package's metadata).
"""

from __future__ import annotations

import errno
import shutil
import socket
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PORTS = {  # port → (what listens there, what a busy port means for a run, what to do)
    8000: ("the endpoint, deploy.port", "FAIL", 'stop what listens there, or make run ARGS="--set port=8001"'),
    8265: ("Ray's dashboard and Jobs API", "warn",
           "another Ray is running (ray status); a local run still starts its own"),
    5000: ("the MLflow UI, raydiff ui", "warn", "raydiff ui --port 5001"),
}
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIN_FREE_GB, LOW_FREE_GB = 2.0, 10.0  # the venv (torch, Ray, MLflow) plus run outputs, and room to spare
FALLBACK_PINS = {"python": ">=3.11,<3.13", "torch": "==2.13.0", "ray": "==2.60.*"}


@dataclass(frozen=True)
class Check:
    status: str  # "ok" | "warn" | "FAIL"
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"  {self.status:<5} {self.what}" + (f"\n        → {self.fix}" if self.fix else "")


def pins() -> dict[str, str]:
    """The version specifiers the project declares for Python, torch and Ray."""
    try:
        requires = {Requirement(r).name: str(Requirement(r).specifier) for r in metadata.requires("raydiff") or []}
        return {"python": metadata.metadata("raydiff")["Requires-Python"], "torch": requires["torch"],
                "ray": requires["ray"]}
    except (metadata.PackageNotFoundError, KeyError):
        return dict(FALLBACK_PINS)


def check_python(version: str, wanted: str) -> Check:
    if version in SpecifierSet(wanted):
        return Check("ok", f"Python {version}")
    return Check("FAIL", f"Python {version}; the project needs {wanted}",
                 "install Python 3.11, then make clean && make run PYTHON=python3.11")


def check_torch(wanted: str) -> Check:
    try:
        import torch
    except ImportError:
        return Check("FAIL", "PyTorch is not installed", "make run installs it (TORCH_INDEX picks the build)")
    version = torch.__version__.split("+")[0]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    device = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU visible"
    what = f"torch {torch.__version__}, {build}, {device}"
    if version not in SpecifierSet(wanted):
        return Check("FAIL", f"{what}; the project needs torch{wanted}",
                     "make clean && make run (or pip install torch==2.13.0 --index-url ...)")
    if torch.version.cuda and not torch.cuda.is_available():
        return Check("warn", what, "runs on the CPU; the CPU build is much smaller: make clean && make run "
                     "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    return Check("ok", what)


def check_ray(wanted: str) -> Check:
    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        return Check("FAIL", "Ray is not installed", "make run installs it")
    if version not in SpecifierSet(wanted):
        return Check("FAIL", f"Ray {version}; the project needs ray{wanted}", "make clean && make run")
    return Check("ok", f"Ray {version}")


def check_port(port: int, role: str, busy: str, fix: str, host: str = "127.0.0.1") -> Check:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            return Check(busy, f"port {port} ({role}) is in use", fix)
    return Check("ok", f"port {port} ({role}) is free")


def check_disk(path: Path) -> Check:
    free_gb = shutil.disk_usage(path).free / 1e9
    what = f"{free_gb:.1f} GB free under {path}"
    if free_gb < MIN_FREE_GB:
        return Check("FAIL", what, f"free at least {MIN_FREE_GB:g} GB (make clean removes .venv and run outputs)")
    if free_gb < LOW_FREE_GB:
        return Check("warn", what, "enough for the local pipeline; checkpoints of bigger models need more")
    return Check("ok", what)


def check_chromium() -> Check:
    found = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    if found:
        return Check("ok", f"Chromium for the browser tests: {found}")
    return Check("warn", "no Chromium: make test's browser tests will fail (a run does not need it)",
                 "apt-get install -y chromium (or put chromium / google-chrome on the PATH)")


def run_checks(workdir: Path) -> list[Check]:
    wanted = pins()
    version = ".".join(map(str, sys.version_info[:3]))
    return [check_python(version, wanted["python"]), check_torch(wanted["torch"]), check_ray(wanted["ray"]),
            *(check_port(port, *about) for port, about in PORTS.items()), check_disk(workdir),
            check_chromium()]


def report(checks: list[Check]) -> tuple[str, int]:
    """The printed report and the exit code (1 when anything must be fixed)."""
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    verdict = f"{failed} to fix before a run" if failed else "ready to run"
    verdict += f", {warned} warning(s)" if warned else ""
    return "\n".join(["raydiff doctor", *(c.line() for c in checks), verdict]), int(failed > 0)
