"""`benchmarks/gpu_check.py --device cpu --tiny`: the accelerator check runs end to end where the accelerator machine
would run it, without Ray, MLflow or webdataset importable (that machine has none of them)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_THE_STACK = """
import runpy, sys
for name in ("ray", "mlflow", "webdataset", "pipelines"):
    sys.modules[name] = None  # importing it is now an ImportError
sys.argv = ["gpu_check", "--device", "cpu", "--tiny", "--json", sys.argv[1]]
runpy.run_module("benchmarks.gpu_check", run_name="__main__")
"""


def test_gpu_check_runs_tiny_on_the_cpu_with_torch_alone(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-c", WITHOUT_THE_STACK, str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert [row["what"] for row in result["train"]] == ["train eager fp32", "train compiled fp32", "train eager bf16",
                                                       "train compiled bf16"]
    assert all(row["img_per_s"] > 0 and 0 < row["mfu"] < 1 for row in result["train"])
    assert result["peak"]["fp32"] > 0 and result["bf16_loss"]["ok"], result["bf16_loss"]
    assert {row["what"] for row in result["sampling"]} == {"sample ddim-5 fp32", "sample ddim-5 bf16",
                                                           "sample dpmpp-2m-4 fp32", "sample dpmpp-2m-4 bf16"}
    assert result["engine"]["img_per_s"] > 0
    assert "MFU" in done.stdout and "bf16 loss" in done.stdout
