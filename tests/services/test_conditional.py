"""Class-conditional sampling over HTTP (real Ray Serve, a 10-class model served under /cond/ beside the
unconditional one): /v1/models lists the classes, class_labels and guidance_scale reach the sampler (by index, by
name or by the index as a string), requests with different labels and scales are batched into shared model calls
and keep their images, bad conditioning is a 422 naming the field, and the client and the CLI pass both fields."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from services.client import APIError, SamplerClient
from services.client_cli import main as cli_main
from tests.services.conftest import COND_MODEL_NAME, DIGIT_NAMES

BASE = {"sampler": "ddim", "steps": 4, "num_images": 2, "seed": 7, "format": "npy"}


def post(served, body, path="v1/samples"):
    return requests.post(served.url + path, json=body, timeout=120)


def samples(served, **change) -> tuple[np.ndarray, dict]:
    r = post(served, {**BASE, **change})
    assert r.status_code == 200, r.text
    body = r.json()
    return np.load(io.BytesIO(base64.b64decode(body["images"][0]))), body


def test_models_list_the_classes(served_conditional, served):
    (info,) = requests.get(served_conditional.url + "v1/models", timeout=30).json()
    assert info["name"] == COND_MODEL_NAME and info["num_classes"] == 10 and info["class_names"] == DIGIT_NAMES
    (plain,) = requests.get(served.url + "v1/models", timeout=30).json()
    assert plain["num_classes"] is None and plain["class_names"] is None


def test_labels_by_index_name_or_index_string_are_one_class(served_conditional):
    by_index, body = samples(served_conditional, class_labels=[7])
    assert body["class_labels"] == [7, 7] and body["guidance_scale"] == 1.0
    for label in ("seven", "7", 7):  # a bare label means that label for every image
        images, other = samples(served_conditional, class_labels=label)
        assert other["class_labels"] == [7, 7] and np.array_equal(images, by_index), label
    same, _ = samples(served_conditional, class_labels=[7], guidance_scale=1.0)
    assert np.array_equal(same, by_index), "guidance_scale 1 is plain conditional sampling"
    per_image, body = samples(served_conditional, class_labels=["three", 9])
    assert body["class_labels"] == [3, 9]


def test_conditioning_and_guidance_change_the_output(served_conditional):
    uncond, body = samples(served_conditional)
    assert body["class_labels"] is None and body["guidance_scale"] == 1.0
    zero, _ = samples(served_conditional, class_labels=[0])
    one, _ = samples(served_conditional, class_labels=[1])
    guided, body = samples(served_conditional, class_labels=[0], guidance_scale=4.0)
    assert body["guidance_scale"] == 4.0
    assert np.abs(zero - one).max() > 1e-3 and np.abs(zero - uncond).max() > 1e-3
    assert np.abs(guided - zero).max() > 1e-3


def test_requests_with_different_labels_and_scales_share_model_calls_and_keep_their_images(served_conditional):
    bodies = [{**BASE, "seed": 1},
              {**BASE, "seed": 2, "class_labels": [3]},
              {**BASE, "seed": 3, "class_labels": ["one", "two"], "guidance_scale": 3.0},
              {**BASE, "seed": 4, "class_labels": [9], "guidance_scale": 7.5, "sampler": "ddpm"},
              {**BASE, "seed": 5, "class_labels": [5], "guidance_scale": 0.0}]
    alone = [post(served_conditional, body).json() for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: post(served_conditional, body).json(), bodies))
    calls = [r["timing"]["batch_images"] for r in together]
    assert max(calls) > 2 + 2, f"no model call held more than one request: {calls}"  # 2 images, + 2 if guided
    for a, t in zip(alone, together):
        assert t["class_labels"] == a["class_labels"] and t["guidance_scale"] == a["guidance_scale"]
        x_alone, x_together = (np.load(io.BytesIO(base64.b64decode(r["images"][0]))) for r in (a, t))
        np.testing.assert_allclose(x_together, x_alone, rtol=0, atol=1e-4)


def test_streaming_takes_the_class(served_conditional):
    steps = []
    result = SamplerClient(served_conditional.url).samples_stream(
        progress=lambda k, n: steps.append(k), sampler="ddim", steps=4, num_images=2, seed=7, format="npy",
        class_labels="seven")
    assert steps == [1, 2, 3, 4] and result.response["class_labels"] == [7, 7]
    plain, _ = samples(served_conditional, class_labels=[7])
    assert np.array_equal(result.array, plain)
    bad = post(served_conditional, {**BASE, "class_labels": ["eleven"]}, path="v1/samples/stream")
    assert bad.status_code == 422 and bad.json()["message"].startswith("class_labels.0")


@pytest.mark.parametrize("change,field,says", [
    ({"class_labels": [10]}, "class_labels.0", "'zero', 'one'"),  # lists the valid classes
    ({"class_labels": ["ten"]}, "class_labels.0", "index 0…9"),
    ({"class_labels": ["Seven"]}, "class_labels.0", "not a class"),
    ({"class_labels": [-1]}, "class_labels.0", "not a class"),
    ({"class_labels": ["-1"]}, "class_labels.0", "not a class"),
    ({"class_labels": [1.5]}, "class_labels.0", "class index"),
    ({"class_labels": [True]}, "class_labels.0", "class index"),
    ({"class_labels": [None]}, "class_labels.0", "class index"),
    ({"class_labels": []}, "class_labels", "at least 1"),
    ({"class_labels": {"seven": 1}}, "class_labels", "list"),
    ({"class_labels": [1, 2, 3]}, "class_labels", "num_images=2"),
    ({"guidance_scale": 3.0}, "guidance_scale", "needs class_labels"),
    ({"class_labels": [1], "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
    ({"class_labels": [1], "guidance_scale": 20.5}, "guidance_scale", "less than or equal to 20"),
    ({"class_labels": [1], "guidance_scale": "3"}, "guidance_scale", "number"),
])
def test_bad_conditioning_is_422_naming_the_field(served_conditional, change, field, says):
    r = post(served_conditional, {**BASE, **change})
    assert r.status_code == 422, r.text
    message = r.json()["message"]
    assert message.startswith(field + ":") and says in message, message


def test_python_client_and_cli(served_conditional, tmp_path, capsys):
    client = SamplerClient(served_conditional.url)
    assert client.models()[0]["class_names"] == DIGIT_NAMES
    result = client.samples(sampler="ddim", steps=4, num_images=3, seed=7, format="npy", class_labels=[1, "two", 3],
                            guidance_scale=2)
    assert result.response["class_labels"] == [1, 2, 3] and result.response["guidance_scale"] == 2.0
    with pytest.raises(APIError) as error:
        client.samples(steps=4, class_labels="eleven")
    assert error.value.status == 422 and error.value.message.startswith("class_labels.0")

    out = tmp_path / "sevens.png"
    assert cli_main(["sample", "--url", served_conditional.url, "--steps", "4", "-n", "4", "--seed", "0",
                     "--class", "7", "--guidance", "3", "-o", str(out)]) == 0
    assert "class seven (guidance 3)" in capsys.readouterr().out and out.exists()
    assert cli_main(["sample", "--url", served_conditional.url, "--steps", "4", "-n", "3", "--seed", "0",
                     "--class", "1,two", "--class", "nine", "-o", str(out)]) == 0
    assert "class one, two, nine (guidance 1)" in capsys.readouterr().out
    assert cli_main(["sample", "--url", served_conditional.url, "--steps", "4", "--class", "eleven",
                     "-o", str(out)]) == 2
    assert "class_labels" in capsys.readouterr().err
