"""Under load: zero errors at 16 concurrent clients; a killed model replica is replaced while clients see only
successes (retried) or clean 503/504s; a redeploy picks up a new champion without failing in-flight requests.

These change the shared application (replica killed, champion moved), so they run last in the package.
"""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import ray
import requests

from services.deploy import deploy
from tests.services.conftest import log_and_register, wait_ready

BODY = {"sampler": "ddim", "steps": 5, "num_images": 2}


class Load:
    """`clients` threads posting BODY in a loop (each with its own session) until stop(); records every outcome."""

    def __init__(self, url: str, clients: int, max_requests: int = 10_000):
        self.url, self.stop_event, self.lock = url + "v1/samples", threading.Event(), threading.Lock()
        self.outcomes: list[tuple] = []
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client, k, max_requests) for k in range(clients)]

    def _client(self, k: int, max_requests: int) -> None:
        session = requests.Session()
        for i in range(max_requests):
            if self.stop_event.is_set():
                return
            start = time.perf_counter()
            try:
                r = session.post(self.url, json={**BODY, "seed": k * 100_000 + i}, timeout=90)
                outcome = (r.status_code, r.json() if r.headers.get("content-type") == "application/json" else r.text)
            except requests.RequestException as error:  # a dropped connection is an unclean failure
                outcome = ("connection-error", repr(error))
            with self.lock:
                self.outcomes.append((start, time.perf_counter(), *outcome))

    def stop(self) -> list[tuple]:
        self.stop_event.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        return self.outcomes


def statuses(outcomes) -> Counter:
    return Counter(o[2] for o in outcomes)


def current_model(served) -> dict:
    return requests.get(served.url + "v1/models", timeout=60).json()[0]


def test_load_16_clients_zero_errors(served):
    load = Load(served.url, clients=16, max_requests=25)
    time.sleep(6)
    outcomes = load.stop()
    counts = statuses(outcomes)
    assert counts == {200: len(outcomes)}, f"errors under load: {counts}"
    assert len(outcomes) >= 16
    batch_sizes = [o[3]["timing"]["batch_requests"] for o in outcomes]
    assert max(batch_sizes) > 1, "concurrent compatible requests were never batched"


def test_killed_replica_is_replaced_and_clients_see_only_clean_outcomes(served):
    before = current_model(served)["replica"]
    load = Load(served.url, clients=8)
    time.sleep(1.5)
    killed_at = time.perf_counter()
    ray.kill(ray.get_actor(before, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the replacement replica to answer
        try:
            r = requests.get(served.url + "v1/models", timeout=30)
            if r.status_code == 200 and r.json()[0]["replica"] != before:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    time.sleep(2)  # and keep the load on the new replica a little
    outcomes = load.stop()
    counts = statuses(outcomes)
    assert set(counts) <= {200, 503, 504}, f"unclean failures after killing {before}: {counts}"
    after = current_model(served)["replica"]
    assert after != before, "the killed replica was not replaced"
    assert any(o[0] > killed_at and o[2] == 200 for o in outcomes), "no request succeeded after the kill"
    in_flight = [o for o in outcomes if o[0] < killed_at < o[1]]
    assert any(o[2] == 200 for o in in_flight), f"no request in flight at the kill was retried: {in_flight}"
    assert requests.get(served.url + "healthz", timeout=10).status_code == 200
    print(f"outcomes around the kill: {dict(counts)}, {len(in_flight)} in flight at the kill")


def test_redeploy_picks_up_new_champion_without_dropping_requests(served, trained):
    tracking_uri, model = trained
    assert current_model(served)["version"] == "1"
    version = log_and_register(model, tracking_uri)  # the same weights as version 2, now @champion
    assert version == "2"
    load = Load(served.url, clients=6)
    time.sleep(1)
    deploy(served.model_uri, tracking_uri, port=served.port, max_batch_size=8, name=served.app_name,
           batch_wait_timeout_s=0.2, max_num_images=32, request_timeout_s=60, max_body_bytes=256 * 1024, device="cpu")
    wait_ready(served.url)
    deadline = time.monotonic() + 120
    while current_model(served)["version"] != "2" and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    outcomes = load.stop()
    assert current_model(served)["version"] == "2"
    assert statuses(outcomes) == {200: len(outcomes)}, f"requests failed during the redeploy: {statuses(outcomes)}"
    versions = Counter(o[3]["model"]["version"] for o in outcomes)
    assert versions["2"] > 0, versions
