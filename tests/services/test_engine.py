"""The serving engine and codecs without Ray: batched sampling equals the library loops per seed, image codecs
round-trip, AppArgs and the Serve config files validate."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion.packaged import DiffusionModel
from diffusion.sampler_specs import SAMPLER_NAMES
from diffusion.samplers import ddim_sample, ddpm_sample
from diffusion.unet import UNet, UNetConfig
from services import codec
from services.args import AppArgs
from services.engine import Engine, SampleJob, slerp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine():
    """An untrained tiny model; one torch thread (tiny convolutions only lose from more, badly so on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield Engine(DiffusionModel(UNet(UNetConfig.preset("tiny")), "linear", 1000).eval(), "cpu")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 10, 0.0), ("ddim", 5, 0.0), ("ddim", 5, 0.5)])
def test_single_job_equals_library_loop(engine, sampler, steps, eta):
    options = {"eta": eta} if sampler == "ddim" else {}
    (ours,) = engine.sample([SampleJob(sampler, steps, num_images=3, seed=7, options=options)])
    g = torch.Generator().manual_seed(7)
    if sampler == "ddpm":
        ref = ddpm_sample(engine.model, engine.schedule, (3, 1, 8, 8), generator=g, steps=steps)
    else:
        ref = ddim_sample(engine.model, engine.schedule, (3, 1, 8, 8), steps=steps, eta=eta, generator=g)
    assert ours.shape == (3, 1, 8, 8) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.clamp(-1, 1), rtol=0, atol=1e-5)


def test_batched_jobs_keep_their_own_noise_and_order(engine):
    jobs = [SampleJob("ddpm", 10, 2, seed=1), SampleJob("ddim", 5, 1, seed=2), SampleJob("ddpm", 10, 3, seed=3),
            SampleJob("ddpm", 10, 2, seed=1, options={"clip_x0": False})]
    merged = engine.sample(jobs)
    assert [tuple(x.shape) for x in merged] == [(2, 1, 8, 8), (1, 1, 8, 8), (3, 1, 8, 8), (2, 1, 8, 8)]
    for job, images in zip(jobs, merged):
        (alone,) = engine.sample([job])
        torch.testing.assert_close(images, alone, rtol=0, atol=1e-5)
        assert np.array_equal(codec.to_uint8(images.numpy()), codec.to_uint8(alone.numpy()))
    assert not torch.equal(merged[0], merged[2][:2]), "different seeds must give different images"
    assert not torch.equal(merged[0], merged[3]), "clip_x0=False must change the images"


def test_every_registered_sampler_shares_model_calls_and_keeps_its_images(engine):
    """Requests of all samplers (multistep, two-call Heun, predictor–corrector) and step counts in one batch: each
    model call serves them all, and every request ends with the images it gets alone and its own NFE."""
    jobs = [SampleJob(name, 4, 2, seed=k, options={"corrector_steps": 2} if name == "pc" else {})
            for k, name in enumerate(SAMPLER_NAMES)]
    trajectories = [engine.start(job) for job in jobs]
    ticks = 0
    while not all(tr.done for tr in trajectories):
        engine.tick(trajectories)
        ticks += 1
    assert ticks == max(tr.progress[1] for tr in trajectories) == 12  # pc: 4 levels × (1 + 2 corrector calls)
    assert {job.sampler: tr.progress[0] for job, tr in zip(jobs, trajectories)} == {
        "ddpm": 4, "ddim": 4, "sde": 4, "pc": 12, "ode-euler": 4, "ode-heun": 7, "dpmpp-2m": 4,
        "distilled": 4}
    for job, tr in zip(jobs, trajectories):
        (alone,) = engine.sample([job])
        torch.testing.assert_close(engine.result(tr), alone, rtol=0, atol=1e-5)


def test_requests_joining_mid_flight_keep_their_seeds(engine):
    """Continuous batching: a request started while another is 4 steps in shares its model calls, yet both end
    with exactly the images they get alone."""
    a, b = SampleJob("ddpm", 10, 2, seed=11), SampleJob("ddim", 6, 3, seed=12, options={"eta": 0.3})
    (alone_a,), (alone_b,) = engine.sample([a]), engine.sample([b])
    ta = engine.start(a)
    for _ in range(4):
        engine.tick([ta])
    tb = engine.start(b)
    ticks = 0
    while not (ta.done and tb.done):
        engine.tick([ta, tb], max_forward=4)  # also exercises the chunked model call
        ticks += 1
    assert ticks == 6  # a's remaining 6 steps and b's 6 steps ran side by side
    torch.testing.assert_close(engine.result(ta), alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(engine.result(tb), alone_b, rtol=0, atol=1e-5)


def test_engine_rejects_steps_out_of_range_and_foreign_options(engine):
    with pytest.raises(ValueError, match="steps"):
        engine.sample([SampleJob("ddim", 1001, 1, 0)])
    with pytest.raises(ValueError, match="option 'eta' applies only to sampler"):
        engine.start(SampleJob("ddpm", 10, 1, 0, options={"eta": 0.5}))


def test_slerp_ends_and_norm():
    a, b = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 8, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-6, rtol=1e-5)
    mid = slerp(a, b, 0.5)
    assert abs(float(mid.norm()) - 0.5 * float(a.norm() + b.norm())) < 0.25 * float(a.norm())


def test_interpolate_shape(engine):
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    out = engine.interpolate(x0, num_points=4, steps=3)
    assert out.shape == (4, 1, 8, 8) and out.abs().max() <= 1


def test_codecs_round_trip():
    images = np.linspace(-1, 1, 2 * 1 * 8 * 8, dtype=np.float32).reshape(2, 1, 8, 8)
    pngs = codec.png_list(images)
    decoded = np.stack([codec.decode_image(codec.decode_b64(p), (1, 8, 8)) for p in pngs])
    assert np.abs(decoded - images).max() <= 1 / 127.5 + 1e-6
    assert np.array_equal(codec.load_npy(codec.npy_bytes(images)), images)
    grid = codec.decode_b64(codec.b64(codec.grid_png(np.concatenate([images] * 3), nrow=4)))
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(grid)).size == (4 * 10 + 2, 2 * 10 + 2)  # 6 images, 4 per row, padding 2


@pytest.mark.parametrize("data,match", [(b"not an image", "not a decodable image"),
                                        (codec.grid_png(np.zeros((4, 1, 8, 8))), "the model takes 8x8")])
def test_decode_image_rejects(data, match):
    with pytest.raises(codec.ImageDecodeError, match=match):
        codec.decode_image(data, (1, 8, 8))


def test_decode_b64_rejects_garbage():
    with pytest.raises(codec.ImageDecodeError, match="base64"):
        codec.decode_b64("%%%not base64")


def test_app_args_fail_loud():
    assert AppArgs(model_uri="models:/m@champion").max_batch_size == 16
    with pytest.raises(ValueError, match="max_batch_sise"):
        AppArgs(model_uri="models:/m@champion", max_batch_sise=4)
    with pytest.raises(ValueError, match="min_replicas"):
        AppArgs(model_uri="models:/m@champion", min_replicas=3, max_replicas=2)


@pytest.mark.parametrize("path", ["configs/serve-local.yaml", "infra/serve/serve-config.yaml"])
def test_serve_configs_validate(path):
    """Both Serve config files pass Serve's own schema (what `serve run`/`serve deploy` check) and our AppArgs."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / path).read_text())
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (app,) = config["applications"]
    assert app["import_path"] == "services.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert {d["name"] for d in app["deployments"]} == {"SamplerDeployment", "Ingress"}
    sampler = next(d for d in app["deployments"] if d["name"] == "SamplerDeployment")
    assert sampler["max_ongoing_requests"] >= args.max_batch_size
