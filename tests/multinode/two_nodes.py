"""A two-node Ray cluster on one machine whose second node cannot see the first one's local files, and an
S3-compatible server on 127.0.0.1: the multi-node test bed of tests/multinode (issue #27).

- The head: ``ray start --head`` bound to 127.0.0.1 (as tests/test_submit.py starts it, dashboard included for
  the Jobs API and Ray Train's State API polling).
- The second node: ``ray start --address=...`` run under ``unshare --mount --propagation private`` with a
  tmpfs mounted over ``<base>/local`` and one over the head's Ray temp dir (a session folder of its own, as on
  another machine): in its mount namespace that folder is an empty, private one, so every
  process of that node (raylet, workers, their children) sees neither the head's files there nor its writes
  there from the head. ``<base>/shared`` stays one folder for both: the stand-in for an NFS mount.
- Storage: ``moto_server`` (moto's server mode, a real HTTP S3 API) on 127.0.0.1; pyarrow's S3FileSystem and
  boto3 reach it through ``AWS_ENDPOINT_URL`` and dummy credentials in each node's environment, never in a config.
- Each node has its own cache of fetched exports (``TRACT_DIST_CACHE``): the head's under ``<base>/local/head``,
  the second node's under ``<base>/local/node2`` (inside its private tmpfs).

Needs root (mount namespaces); ``available()`` says whether this machine allows them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

BUCKET = "tract-multinode"
RESOURCE = "tract_node_slot"  # one per node: a training worker asking for it is placed one per node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> tuple[bool, str]:
    """Whether this machine can run the cluster: root, ``unshare`` with mount namespaces, moto's server."""
    if shutil.which("unshare") is None:
        return False, "no unshare"
    if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
        return False, "moto[server] is not installed (requirements/ci.txt)"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs tract-probe /mnt"], capture_output=True, timeout=30)
    return (r.returncode == 0, r.stderr.decode(errors="replace").strip() or "mount namespaces allowed")


@dataclass
class Cluster:
    base: Path
    gcs: str  # host:port for RAY_ADDRESS / ray start --address
    dashboard: str  # http://127.0.0.1:port (Jobs API)
    s3_env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    node2: subprocess.Popen | None = None
    start_node2: Callable[[], subprocess.Popen] | None = None

    @property
    def shared(self) -> Path:
        return self.base / "shared"

    @property
    def local(self) -> Path:
        return self.base / "local"

    def driver_env(self) -> dict[str, str]:
        """Environment of a driver on the head's machine (the head's cache, the cluster's address, loopback)."""
        from tract_dist.runtime.ray_cluster import local_ray_env

        return {**os.environ, **self.s3_env, **local_ray_env(), "RAY_ADDRESS": self.gcs,
                "TRACT_DIST_CACHE": str(self.local / "head"),
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    def kill_node2(self) -> None:
        """SIGKILL the second node's whole process group (raylet, its workers): the node dies as a host would."""
        if self.node2 is not None and self.node2.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.node2.pid, signal.SIGKILL)
            self.node2.wait(30)

    def restart_node2(self) -> None:
        """Start a new second node (a fresh private namespace and tmpfs) after :meth:`kill_node2`."""
        assert self.start_node2 is not None
        self.node2 = self.start_node2()
        self.procs.append(self.node2)
        _wait(lambda: self.alive_nodes() >= 2, "the restarted second node", 180, [self.node2])

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS reports them (``ray.nodes()`` from a driver of its own)."""
        r = subprocess.run([sys.executable, "-c", "import ray; ray.init(log_to_driver=False); "
                            "print('ALIVE', sum(bool(n['Alive']) for n in ray.nodes()))"],
                           env=self.driver_env(), capture_output=True, text=True, timeout=120)
        return int(next((x.split()[1] for x in r.stdout.splitlines() if x.startswith("ALIVE ")), 0))


def _wait(pred, what: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up" + (f" ({dead[0][:3]} exited)" if dead else ""))
        time.sleep(1)


def _node_ports() -> tuple[list[str], int]:
    lo = 20000 + (os.getpid() % 100) * 120  # worker port ranges of their own: the suite's Ray uses the default
    ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
             f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]
    return ports, lo


@contextlib.contextmanager
def two_node_cluster(base: Path, *, cpus_per_node: int = 2) -> Iterator[Cluster]:
    """Start moto, the head and the private second node; yield the :class:`Cluster`; stop all of them."""
    from tract_dist.runtime.ray_cluster import local_ray_env

    base.mkdir(parents=True, exist_ok=True)
    for d in ("shared", "local/head"):
        (base / d).mkdir(parents=True, exist_ok=True)
    ray_bin = str(Path(sys.executable).parent / "ray")
    tmp = Path("/tmp") / f"ray-2n-{os.getpid()}"  # short: Ray's socket paths have a length limit
    s3_port = _free_port()
    s3_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
              "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_EC2_METADATA_DISABLED": "true"}
    procs: list[subprocess.Popen] = []
    log = open(base / "cluster.log", "ab")
    base_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    repo = str(Path(__file__).resolve().parents[2])  # node_start is run as a module of this checkout
    base_env["PYTHONPATH"] = os.pathsep.join(x for x in (repo, base_env.get("PYTHONPATH")) if x)
    base_env.update(s3_env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    try:
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                       "-p", str(s3_port)], stdout=log, stderr=log, start_new_session=True))
        import boto3

        def bucket() -> bool:
            try:
                boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                             aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        _wait(bucket, "moto_server", 60, procs)

        gcs, dash = _free_port(), _free_port()
        ports, lo = _node_ports()
        head_env = {**base_env, **local_ray_env(), "TRACT_DIST_CACHE": str(base / "local" / "head")}
        procs.append(subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={cpus_per_node}",
             f"--resources={json.dumps({RESOURCE: 1})}", f"--temp-dir={tmp}", "--include-dashboard=true",
             "--object-store-memory=150000000", "--disable-usage-stats", f"--ray-client-server-port={_free_port()}",
             f"--min-worker-port={lo}", f"--max-worker-port={lo + 59}", *ports],
            env=head_env, stdout=log, stderr=log, start_new_session=True))
        address = f"127.0.0.1:{gcs}"
        ports2, _ = _node_ports()
        # The second node: its own mount namespace, a private tmpfs over <base>/local (then its cache inside it).
        node2_env = {**base_env, **local_ray_env(), "TRACT_DIST_CACHE": str(base / "local" / "node2")}
        # Its Ray temp dir is private too: two nodes sharing one session folder share runtime_resources/, where
        # each node's runtime-env agent unpacks (and garbage-collects) a job's working_dir: seen deleting the
        # head's copy under a running job.
        tmp.mkdir(parents=True, exist_ok=True)
        script = ('mount -t tmpfs -o size=1g tract-node2 "$0" && mount -t tmpfs -o size=2g tract-node2-ray "$1" && '
                  'mkdir -p "$0/node2" && cd "$0/node2" && shift && exec "$@"')
        def start_node2() -> subprocess.Popen:
            return subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(base / "local"), str(tmp),
                 sys.executable, "-m", "tests.multinode.node_start", "start", f"--address={address}", "--block",
                 "--node-ip-address=127.0.0.1",
                 f"--num-cpus={cpus_per_node}", f"--resources={json.dumps({RESOURCE: 1})}",
                 "--object-store-memory=150000000", "--disable-usage-stats",
                 f"--min-worker-port={lo + 60}", f"--max-worker-port={lo + 119}", *ports2],
                env=node2_env, stdout=log, stderr=log, start_new_session=True)

        node2 = start_node2()
        procs.append(node2)

        def two_alive() -> bool:
            r = subprocess.run([ray_bin, "status", f"--address={address}"], env=head_env, capture_output=True,
                               text=True, timeout=60)
            return r.returncode == 0 and r.stdout.count(" node_") >= 2 and "Pending:\n (no pending nodes)" in r.stdout
        _wait(two_alive, "the two-node Ray cluster", 180, procs)
        yield Cluster(base, address, f"http://127.0.0.1:{dash}", s3_env, procs, node2, start_node2)
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
