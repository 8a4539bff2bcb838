"""The HTTP API on real Ray Serve (127.0.0.1, free port) with a small trained model from a real MLflow store."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from diffusion.sampler_specs import SAMPLER_NAMES
from services.client import APIError, SamplerClient
from services.client_cli import main as cli_main
from tests.services.conftest import MODEL_NAME, digits_x0


def post(served, path, body, **kwargs):
    return requests.post(served.url.rstrip("/") + path, json=body, timeout=120, **kwargs)


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def digit_png(k: int) -> bytes:
    pixels = np.rint((digits_x0()[k, 0].numpy() + 1) * 127.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_ready_and_models(served):
    assert requests.get(served.url + "healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(served.url + "readyz", timeout=30).status_code == 200
    (info,) = requests.get(served.url + "v1/models", timeout=30).json()
    assert info["name"] == MODEL_NAME and info["version"] == "1" and info["alias"] == "champion"
    assert info["uri"] == served.model_uri and info["loaded_uri"] == f"models:/{MODEL_NAME}/1"
    assert (info["image_size"], info["channels"], info["num_timesteps"]) == (8, 1, 1000)
    assert info["training_run_id"] == served.training_run_id
    assert info["replica"].startswith("SERVE_REPLICA::")
    samplers = {s["name"]: s for s in info["samplers"]}  # from the sampler registry's catalog
    assert tuple(samplers) == SAMPLER_NAMES and samplers["ddim"]["options"]["eta"] == 0.0
    assert samplers["ddpm"]["default_steps"] is None and samplers["ddpm"]["options"]["clip_denoised"] is True


@pytest.mark.parametrize("sampler,steps", [("ddpm", 10), ("ddim", 5)])
def test_sampling_both_samplers_all_formats(served, sampler, steps):
    png = post(served, "/v1/samples", {"sampler": sampler, "steps": steps, "num_images": 3, "seed": 1})
    assert png.status_code == 200, png.text
    body = png.json()
    assert body["format"] == "png" and len(body["images"]) == 3 and body["shape"] == [3, 1, 8, 8]
    assert body["sampler"] == sampler and body["steps"] == steps and body["seed"] == 1
    assert body["model"]["version"] == "1" and body["timing"]["batch_requests"] >= 1
    assert all(png_pixels(item).shape == (8, 8) for item in body["images"])

    npy = post(served, "/v1/samples", {"sampler": sampler, "steps": steps, "num_images": 3, "seed": 1,
                                       "format": "npy"}).json()
    array = np.load(io.BytesIO(base64.b64decode(npy["images"][0])))
    assert array.shape == (3, 1, 8, 8) and array.dtype == np.float32 and np.abs(array).max() <= 1
    assert np.array_equal(np.rint((array[:, 0] + 1) * 127.5).astype(np.uint8),
                          np.stack([png_pixels(item) for item in body["images"]]))

    grid = post(served, "/v1/samples", {"sampler": sampler, "steps": steps, "num_images": 4, "seed": 1,
                                        "format": "grid", "nrow": 2}).json()
    assert len(grid["images"]) == 1 and png_pixels(grid["images"][0]).shape == (2 * 10 + 2, 2 * 10 + 2)


def test_default_steps_and_random_seed(served):
    body = post(served, "/v1/samples", {"sampler": "ddim", "steps": 3}).json()
    assert isinstance(body["seed"], int) and body["eta"] == 0.0 and body["shape"] == [1, 1, 8, 8]
    assert post(served, "/v1/samples", {"sampler": "ddim"}).json()["steps"] == 50


def test_samples_look_like_digits_not_noise(served):
    """The trained model puts most pixels on the dark background (−1), as digits do; N(0, I) noise would not."""
    body = post(served, "/v1/samples", {"sampler": "ddim", "steps": 20, "num_images": 16, "seed": 3,
                                        "format": "npy"}).json()
    x = np.load(io.BytesIO(base64.b64decode(body["images"][0])))
    assert (x < -0.8).mean() > 0.3, f"only {(x < -0.8).mean():.2f} of pixels dark: samples look like noise"


def test_same_seed_same_images(served):
    request = {"sampler": "ddpm", "steps": 10, "num_images": 2, "seed": 42}
    first, second = (post(served, "/v1/samples", request).json() for _ in range(2))
    assert first["images"] == second["images"]
    other = post(served, "/v1/samples", {**request, "seed": 43}).json()
    assert other["images"] != first["images"]
    eta = {"sampler": "ddim", "steps": 5, "eta": 1.0, "num_images": 2, "seed": 42}
    assert post(served, "/v1/samples", eta).json()["images"] == post(served, "/v1/samples", eta).json()["images"]


def test_concurrent_requests_are_batched_and_keep_their_seeds(served):
    """8 concurrent compatible requests share batches (observed batch size > 1), and each seed's images equal
    that seed's images sampled alone."""
    alone = {seed: post(served, "/v1/samples", {"sampler": "ddim", "steps": 5, "num_images": 2, "seed": seed}).json()
             for seed in (0, 5)}
    assert alone[0]["timing"]["batch_requests"] == 1

    def one(seed):
        return post(served, "/v1/samples", {"sampler": "ddim", "steps": 5, "num_images": 2, "seed": seed}).json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    sizes = [r["timing"]["batch_requests"] for r in results]
    assert max(sizes) > 1, f"no request was batched with another: {sizes}"
    model_calls = [r["timing"]["batch_images"] for r in results]
    assert max(model_calls) > 2, f"no model call held more than one request's images: {model_calls}"
    for r in results:
        if r["seed"] in alone:
            assert r["images"] == alone[r["seed"]]["images"], \
                f"seed {r['seed']} changed when batched with {r['timing']['batch_requests'] - 1} other requests"


def test_incompatible_requests_in_one_batch_are_grouped(served):
    requests_ = [{"sampler": "ddim", "steps": 5, "num_images": 1, "seed": 1},
                 {"sampler": "ddpm", "steps": 4, "num_images": 2, "seed": 1, "variance": "large",
                  "spacing": "trailing"},
                 {"sampler": "ddim", "steps": 3, "num_images": 3, "seed": 1, "eta": 0.5}]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda b: post(served, "/v1/samples", b), requests_))
    assert [r.status_code for r in results] == [200, 200, 200]
    assert [r.json()["shape"][0] for r in results] == [1, 2, 3]
    assert [r.json()["steps"] for r in results] == [5, 4, 3]
    assert [r.json()["options"] for r in results] == [{}, {"variance": "large", "spacing": "trailing"}, {"eta": 0.5}]


def test_likelihood(served):
    client = SamplerClient(served.url)
    noise = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    out = client.likelihood([digit_png(0), digit_png(1), noise])
    assert len(out["bits_per_dim"]) == 3 and all(0 < b < 20 for b in out["bits_per_dim"])
    np.testing.assert_allclose(np.array(out["prior_bpd"]) + out["vb_bpd"] + out["decoder_bpd"], out["bits_per_dim"],
                               rtol=1e-6)
    assert out["bits_per_dim"][2] > max(out["bits_per_dim"][:2]), "noise should be less likely than digits"
    raw = requests.post(served.url + "v1/likelihood", data=digit_png(0), headers={"content-type": "image/png"},
                        timeout=120)
    assert raw.status_code == 200 and len(raw.json()["bits_per_dim"]) == 1


def test_streaming_progress(served):
    steps = []
    result = SamplerClient(served.url).samples_stream(progress=lambda k, n: steps.append((k, n)), sampler="ddpm",
                                                      steps=6, num_images=2, seed=42)
    assert steps == [(k, 6) for k in range(1, 7)]
    assert result.images.shape == (2, 8, 8, 1)
    same = post(served, "/v1/samples", {"sampler": "ddpm", "steps": 6, "num_images": 2, "seed": 42}).json()
    assert result.response["images"] == same["images"]
    bad = requests.post(served.url + "v1/samples/stream", json={"steps": 0}, timeout=30)
    assert bad.status_code == 422 and bad.json()["message"].startswith("steps")


def test_score_samplers_and_solvers_over_http_mixed_in_one_batch(served):
    """Every registered sampler through POST /v1/samples at once (their requests share the model calls); the
    stream of a two-call Heun run counts model calls, not steps."""
    bodies = [{"sampler": "sde", "steps": 8, "num_images": 2, "seed": 1},
              {"sampler": "pc", "steps": 4, "num_images": 2, "seed": 1, "corrector_steps": 1, "snr": 0.1},
              {"sampler": "ode-euler", "steps": 5, "num_images": 2, "seed": 1},
              {"sampler": "ode-heun", "steps": 4, "num_images": 2, "seed": 1},
              {"sampler": "dpmpp-2m", "steps": 6, "num_images": 2, "seed": 1, "clip_denoised": False}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: post(served, "/v1/samples", b), bodies))
    assert [r.status_code for r in results] == [200] * len(bodies), [r.text for r in results]
    assert [(r.json()["sampler"], r.json()["steps"]) for r in results] == [(b["sampler"], b["steps"]) for b in bodies]
    assert results[1].json()["options"] == {"corrector_steps": 1, "snr": 0.1}
    again = post(served, "/v1/samples", bodies[4]).json()
    assert again["images"] == results[4].json()["images"]  # batched or alone, a seed gives its images
    calls = []
    SamplerClient(served.url).samples_stream(progress=lambda k, n: calls.append((k, n)), sampler="ode-heun", steps=4,
                                             num_images=1, seed=3)
    assert calls == [(k, 7) for k in range(1, 8)]


def test_interpolate(served):
    result = SamplerClient(served.url).interpolate(digit_png(0), digit_png(1), num_points=5, steps=10, format="png")
    assert result.response["shape"] == [5, 1, 8, 8] and result.images.shape == (5, 8, 8, 1)
    grid = SamplerClient(served.url).interpolate(digit_png(0), digit_png(1), num_points=4, steps=10)
    assert grid.images.shape == (1, 10 + 2, 4 * 10 + 2, 1)


def test_openapi_and_docs(served):
    schema = requests.get(served.url + "openapi.json", timeout=30).json()
    paths = {"/v1/samples", "/v1/samples/stream", "/v1/models", "/v1/likelihood", "/v1/interpolate", "/healthz",
             "/readyz"}
    assert paths <= set(schema["paths"])
    assert "SampleRequest" in schema["components"]["schemas"]
    assert requests.get(served.url + "docs", timeout=30).status_code == 200
    page = requests.get(served.url, timeout=30)
    assert page.status_code == 200 and "raydiff" in page.text and "text/html" in page.headers["content-type"]


def test_python_client(served):
    client = SamplerClient(served.url)
    assert client.healthy() and client.ready() and client.models()[0]["name"] == MODEL_NAME
    result = client.samples(sampler="ddim", steps=5, num_images=4, seed=9, format="npy")
    assert result.array.shape == (4, 1, 8, 8) and result.images.shape == (4, 8, 8, 1)
    with pytest.raises(APIError) as error:
        client.samples(sampler="ddim", steps=0)
    assert error.value.status == 422 and "steps" in error.value.message


def test_cli_sample_writes_grid(served, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--url", served.url, "--sampler", "ddim", "--steps", "5", "-n", "16",
                     "--seed", "0", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == (4 * 10 + 2, 4 * 10 + 2)
    assert cli_main(["sample", "--url", served.url, "--steps", "5000", "-o", str(out)]) == 2
    assert "steps" in capsys.readouterr().err


def test_cli_commands_register():
    import argparse

    from services.client_cli import add_commands

    parser = argparse.ArgumentParser(prog="raydiff")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--model-uri", "models:/m@champion", "--port", "8123"])
    assert args.port == 8123 and args.func.__name__ == "cmd_serve"
    args = parser.parse_args(["sample", "--url", "http://x", "--sampler", "ddim", "--steps", "50", "-n", "16",
                              "-o", "grid.png"])
    assert (args.num_images, args.output) == (16, "grid.png")
