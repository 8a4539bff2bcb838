"""Our FID Inception port (pipelines/evaluate/inception.py) against pytorch-fid's InceptionV3, the reference FID
implementation, both holding one shared randomly initialised state dict: the same pool3 features on the same images,
and the same FID of two fixed image sets.

pytorch-fid builds on torchvision's Inception blocks, and the torchvision wheel that pairs with this torch is built for
CUDA: its compiled operators do not load beside the CPU torch, and diffusers fails to import wherever that torchvision
is importable. So `make test` installs the two into `.venv/fid-reference` (outside the environment) and the reference
runs in a subprocess with that folder on its path, declaring the schemas of the two operators torchvision registers
fake kernels for at import (`nms`, `qnms`); nothing else of its compiled code is used."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.evaluate.frechet import fid_from_features
from pipelines.evaluate.inception import FEATURE_DIM, FIDInceptionV3

REFERENCE_PATH = Path(sys.prefix) / "fid-reference"
REFERENCE = """
import sys
from pathlib import Path
import numpy as np
import torch
library = torch.library.Library("torchvision", "DEF")
for op in ("nms", "qnms"):
    library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
from pytorch_fid import fid_score, inception
tmp = Path(sys.argv[1])
inception.load_state_dict_from_url = lambda url, progress=True: torch.load(tmp / "state.pth")  # no download
net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                            normalize_input=True, use_fid_inception=True).eval()
sets = torch.load(tmp / "images.pt")
with torch.no_grad():
    features = {name: net(images)[0].squeeze(-1).squeeze(-1).double().numpy() for name, images in sets.items()}
stats = lambda f: (f.mean(axis=0), np.cov(f, rowvar=False))
fid = fid_score.calculate_frechet_distance(*stats(features["a"]), *stats(features["b"]))
np.savez(tmp / "reference.npz", fid=fid, **features)
"""


def image_set(seed: int, count: int) -> torch.Tensor:
    """8-bit images in [0, 1], 32×32 RGB (pytorch-fid's input convention)."""
    return torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).float() / 255


def shared_network(tmp: Path) -> FIDInceptionV3:
    """Our network with random weights and batch-norm statistics, its state dict saved for the reference (with the
    classifier pytorch-fid's file holds)."""
    torch.manual_seed(0)
    ours = FIDInceptionV3()
    for name, buffer in ours.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0.0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, FEATURE_DIM) * 0.01, torch.zeros(1008)
    torch.save(state, tmp / "state.pth")
    return ours.eval()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """(our features by set, our FID, the reference's npz) on sets a (6 + 24 images) and b (24 images)."""
    assert REFERENCE_PATH.is_dir(), f"{REFERENCE_PATH} missing: `make test` installs torchvision and pytorch-fid there"
    tmp = tmp_path_factory.mktemp("fid-reference")
    ours = shared_network(tmp)
    sets = {"a": image_set(2, 24), "b": image_set(3, 24)}
    torch.save(sets, tmp / "images.pt")
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(tmp)], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REFERENCE_PATH), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        mine = {name: ours(images * 2 - 1).double().numpy() for name, images in sets.items()}  # ours: [−1, 1]
    return mine, fid_from_features(mine["a"], mine["b"]), np.load(tmp / "reference.npz")


def test_pool_features_equal_pytorch_fids(compared):
    mine, _, reference = compared
    for name in ("a", "b"):
        assert mine[name].shape == reference[name].shape == (24, FEATURE_DIM)
        assert np.abs(reference[name]).max() > 1e-3
        np.testing.assert_allclose(mine[name], reference[name], rtol=0, atol=1e-4)


def test_fid_of_two_fixed_sets_equals_pytorch_fids(compared):
    _, fid, reference = compared
    assert float(reference["fid"]) > 0
    assert abs(fid - float(reference["fid"])) <= 1e-3, (fid, float(reference["fid"]))
