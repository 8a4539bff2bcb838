"""Waiting for the resources a stage asks for: a request the cluster cannot meet yet (GPU nodes that an autoscaler
adds from zero, say) is handed to the autoscaler and waited for, with a notice, then refused with a clear error."""

from __future__ import annotations

import time
from typing import Callable


class ResourcesUnavailable(RuntimeError):
    pass


def shortfall(needed: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """The part of `needed` (per resource) that `have` does not cover."""
    return {name: amount - have.get(name, 0.0) for name, amount in needed.items() if amount > have.get(name, 0.0) + 1e-9}


def _text(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items())) or "nothing"


def wait_for_resources(needed: dict[str, float], timeout_s: float, what: str, log: Callable[[str], None] = print,
                       poll_s: float = 2.0) -> None:
    """Return once the cluster's total resources cover `needed`; meanwhile ask Ray's autoscaler for them and say so.
    After `timeout_s` seconds a ResourcesUnavailable names `what`, what it needs and what the cluster has."""
    import ray

    missing = shortfall(needed, ray.cluster_resources())
    if not missing:
        return
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in needed.items() if v > 0}])
    except Exception as error:  # noqa: BLE001 — no autoscaler (a fixed cluster): waiting is all we can do
        log(f"[raydiff] {what}: could not ask the autoscaler for nodes ({error})")
    log(f"[raydiff] {what} needs {_text(needed)}; the cluster lacks {_text(missing)}: waiting up to {timeout_s:g} s "
        "for the autoscaler to add nodes")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        if not shortfall(needed, ray.cluster_resources()):
            log(f"[raydiff] {what}: {_text(needed)} available")
            return
    raise ResourcesUnavailable(f"{what} needs {_text(needed)} but after {timeout_s:g} s the cluster has "
                               f"{_text({k: ray.cluster_resources().get(k, 0.0) for k in needed})}: add nodes that "
                               "have them (or let the autoscaler), or ask for less")
