"""A local Ray started by tract-dist, in a fresh process with RAY_AUTH_MODE unset (a user's default): token
authentication is on, the node is 127.0.0.1, every port any of its processes listens on is loopback-only,
and the dashboard refuses a request without the token."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROBE = r"""
import json, urllib.error, urllib.request
import psutil
from tract_dist.runtime.ray_cluster import init_ray

init_ray(None, num_cpus=1, object_store_memory_mb=100, log_to_driver=False)
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode

me = psutil.Process()
listening = {}
for p in [me, *me.children(recursive=True)]:
    try:
        conns = (p.net_connections if hasattr(p, "net_connections") else p.connections)(kind="inet")
        name = p.name()
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        continue
    for c in conns:
        if c.status == psutil.CONN_LISTEN:
            listening.setdefault(c.laddr.ip, set()).add(name)
web = ray._private.worker._global_node.address_info["webui_url"]
try:
    urllib.request.urlopen(f"http://{web}/api/jobs/", timeout=10)
    unauthenticated = 200
except urllib.error.HTTPError as e:
    unauthenticated = e.code
print(json.dumps({"token_mode": get_authentication_mode() == AuthenticationMode.TOKEN,
                  "node_ip": ray.util.get_node_ip_address(), "dashboard": web,
                  "listening": {ip: sorted(n) for ip, n in listening.items()},
                  "unauthenticated_status": unauthenticated}))
ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv6 socket bound to the IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_local_ray_has_token_auth_and_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS",
                                                             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    assert env.get("RAY_AUTH_TOKEN_PATH")  # the suite's token (tests/conftest.py): nothing written to ~/.ray
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["token_mode"] is True
    assert got["node_ip"] == "127.0.0.1" and got["dashboard"].startswith("127.0.0.1:")
    assert got["listening"], "found no listening socket: the probe is broken"
    assert all(_loopback(ip) for ip in got["listening"]), got["listening"]
    assert got["unauthenticated_status"] == 401
