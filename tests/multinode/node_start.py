"""``ray start --address=127.0.0.1:PORT`` for a second node on one machine, kept on loopback.

Ray's CLI refuses to add a node while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the setting that keeps a local
Ray on 127.0.0.1, runtime/ray_cluster.py), and with it set to 1 replaces the head's 127.0.0.1 with this
machine's routable address, where a loopback-bound head does not listen. So this process (only) allows the
second node and keeps the loopback address as given; the node's own processes run with the variable at 0.
Test-only: a real cluster's nodes have routable addresses.
"""

import sys

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["ray", *sys.argv[1:]]
    main()
