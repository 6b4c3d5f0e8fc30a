"""Connecting to Ray: a given cluster, the job's cluster, or an embedded local one.

Shared by the two distributed stages (scoring actors, proxy training on Ray
Train) so both start the same embedded Ray when no cluster is named.
"""

from __future__ import annotations

import os

import ray

# Ray advertises 127.0.0.1 as the machine's network address; another loopback
# address keeps the embedded cluster's advertised address on loopback.
LOCAL_NODE_IP = "127.0.0.2"


def embedded(address: str | None) -> bool:
    """Whether :func:`connect` would start a Ray of its own (sized for this machine)."""
    return not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def connect(address: str | None, num_cpus: int) -> bool:
    """Connect to ``address`` (or the job's cluster) or start an embedded Ray; True if we started it."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit`, RAY_ADDRESS names the cluster.
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=LOCAL_NODE_IP,
        log_to_driver=True,
        configure_logging=False,
    )
    return True
