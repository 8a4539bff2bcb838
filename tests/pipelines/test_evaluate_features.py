"""FID feature networks: the digits CNN (trained on TRAIN less a seeded hold-out, deterministic, cached) and the
local-file Inception-v3."""

import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.digits_net import (DigitsNetRecipe, cache_key, holdout_split, load_or_train_digits_net,
                                           train_digits_net)
from pipelines.evaluate.features import FeatureExtractor, build_feature_extractor, quantize_8bit
from pipelines.evaluate.frechet import fid_from_features
from pipelines.evaluate.inception import FEATURE_DIM, FIDInceptionV3, load_fid_inception


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Trained once per session into a cache shared with the other evaluate tests; the wall time is recorded."""
    train_x, train_y, _, _ = digits
    start = time.perf_counter()
    result = load_or_train_digits_net(train_x, train_y, seed=0, cache_dir=tmp_path_factory.getbasetemp() / "featnet")
    return result, time.perf_counter() - start


def test_digits_net_classifies_held_out_digits(digits, trained):
    _, _, test_x, test_y = digits
    result, seconds = trained
    assert seconds < 60.0  # a few seconds on an idle 2-core machine; other work on the cores slows it
    with torch.no_grad():
        accuracy = (result.net(test_x).argmax(dim=1) == test_y).float().mean().item()
    assert accuracy > 0.93 and result.val_accuracy > 0.93


def test_digits_net_is_deterministic_and_never_trains_on_its_holdout(digits, trained):
    """The hold-out (30% of TRAIN, seeded) is what the reported accuracy is measured on, and what the FID floor uses
    as real images the net never saw: the net trained on the other 70% alone is the same net, bit for bit."""
    train_x, train_y, _, _ = digits
    result = trained[0]
    holdout, rest = holdout_split(train_x.shape[0], 0, DigitsNetRecipe())
    assert torch.equal(result.holdout, holdout) and holdout.numel() == round(0.3 * train_x.shape[0])
    assert torch.equal(torch.cat([holdout, rest]).sort().values, torch.arange(train_x.shape[0]))
    with torch.no_grad():
        accuracy = (result.net(train_x[holdout]).argmax(dim=1) == train_y[holdout]).double().mean().item()
    assert result.val_accuracy == pytest.approx(accuracy, abs=1e-6)
    # Training is deterministic, and changing the held-out images' labels cannot change the net: it never saw them
    # (only the cache key moves).
    scrambled = train_y.clone()
    scrambled[holdout] = (scrambled[holdout] + 1) % 10
    net, _ = train_digits_net(train_x, scrambled, seed=0)
    for (name, a), b in zip(result.net.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name
    assert cache_key(train_x, scrambled, 0, DigitsNetRecipe()) != cache_key(train_x, train_y, 0, DigitsNetRecipe())


def test_digits_net_is_cached_by_data_and_seed(digits, trained):
    train_x, train_y, _, _ = digits
    first = trained[0]
    assert first.cache_path is not None and first.cache_path.is_file()
    mtime = first.cache_path.stat().st_mtime_ns
    start = time.perf_counter()
    reloaded = load_or_train_digits_net(train_x, train_y, seed=0, cache_dir=first.cache_path.parent)
    assert time.perf_counter() - start < 1.0
    assert reloaded.cache_path == first.cache_path and first.cache_path.stat().st_mtime_ns == mtime
    assert reloaded.val_accuracy == first.val_accuracy
    for a, b in zip(first.net.state_dict().values(), reloaded.net.state_dict().values()):
        assert torch.equal(a, b)
    recipe = DigitsNetRecipe()
    key = cache_key(train_x, train_y, 0, recipe)
    assert key[:24] in first.cache_path.name
    assert cache_key(train_x[:-1], train_y[:-1], 0, recipe) != key
    assert cache_key(train_x, train_y.roll(1), 0, recipe) != key
    assert cache_key(train_x, train_y, 1, recipe) != key
    assert cache_key(train_x, train_y, 0, DigitsNetRecipe(epochs=3)) != key
    assert cache_key(train_x, train_y, 0, DigitsNetRecipe(holdout_fraction=0.1)) != key
    assert torch.equal(reloaded.holdout, first.holdout)


def test_unreadable_cache_file_is_named(digits, trained, tmp_path):
    train_x, train_y, _, _ = digits
    bad = tmp_path / trained[0].cache_path.name
    bad.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=str(bad)):
        load_or_train_digits_net(train_x, train_y, seed=0, cache_dir=tmp_path)


def test_fid_with_digits_features_separates_real_from_noise(digits, trained):
    train_x, _, test_x, _ = digits
    extract = FeatureExtractor("digits", trained[0].net, batch_size=128)
    real_test = extract(test_x)
    noise = torch.rand(test_x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid_same = fid_from_features(real_test, real_test)
    fid_real = fid_from_features(real_test, extract(train_x))
    fid_noise = fid_from_features(real_test, extract(noise))
    assert abs(fid_same) < 1e-6
    assert fid_real < 0.1 * fid_noise, (fid_real, fid_noise)
    # Two disjoint halves of TRAIN are as close to each other as TRAIN is to TEST (same distribution).
    half = train_x.shape[0] // 2
    fid_halves = fid_from_features(extract(train_x[:half]), extract(train_x[half:]))
    assert fid_halves < 0.1 * fid_noise


def test_inception_matches_torchvision_parameter_count():
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and fc (2,049,000):
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 27_161_264 - 3_326_696 - 2_049_000


def test_inception_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    source = FIDInceptionV3().eval()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, FEATURE_DIM), torch.zeros(1008)  # as in pytorch-fid's file
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    config = EvaluateConfig(fid_feature_net="inception", inception_weights=str(path), sample_batch_size=2)
    extract = build_feature_extractor(config, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = extract(images)
    assert extract.name == "inception" and features.shape == (3, FEATURE_DIM)
    with torch.no_grad():
        np.testing.assert_allclose(features, source(quantize_8bit(images)).double().numpy(), rtol=1e-5, atol=1e-6)


def test_features_see_samples_quantised_to_8_bits_as_real_images_are(digits, trained):
    """A sample off the 8-bit grid scores as its PNG would; real images (on the grid) are unchanged."""
    _, _, test_x, _ = digits
    extract = FeatureExtractor("digits", trained[0].net, batch_size=64)
    assert torch.equal(quantize_8bit(test_x), test_x)
    jitter = (torch.rand(test_x.shape, generator=torch.Generator().manual_seed(0)) - 0.5) / 300  # < half a level
    np.testing.assert_array_equal(extract(test_x + jitter), extract(test_x))
    assert torch.allclose(quantize_8bit(torch.tensor([-1.5, -1.0, 0.0, 0.003, 1.2])),
                          torch.tensor([-1.0, -1.0, 1 / 255, 1 / 255, 1.0]), atol=1e-7, rtol=0)  # 127.5 rounds to 128


def test_inception_weights_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="inception_weights.*nope.pth"):
        load_fid_inception(missing)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="inception_weights.*wrong.pth.*does not match"):
        load_fid_inception(wrong)


def test_inception_needs_a_configured_path():
    with pytest.raises(ValidationError, match="needs inception_weights"):
        EvaluateConfig(fid_feature_net="inception")
    with pytest.raises(ValidationError, match="inception_weights is set"):
        EvaluateConfig(inception_weights="/some/file.pth")
