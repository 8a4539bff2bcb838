"""Fixtures the evaluate tests share."""

import pytest
import torch

from pipelines.evaluate.digits import digits_split


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread and lose much (10× here) when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """The embedded digits at 8×8: (train images, train labels, test images, test labels)."""
    return digits_split(size=8)
