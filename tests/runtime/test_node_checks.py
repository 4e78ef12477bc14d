"""The two cluster checks of issue #27 that CI can run on one node (the real two-node paths: tests/multinode):
the launch check's per-node probe on a real local Ray with a node list holding one node that does not exist,
and the lost-node message of a fixed-size run against fake ``ray.nodes()`` listings."""

from __future__ import annotations

import pytest

from tract_dist.errors import RunFailure
from tract_dist.runtime import node_loss
from tract_dist.runtime.storage_check import check_shared_storage, unshared_nodes


def _node(nid: str, ip: str, alive: bool = True) -> dict:
    return {"NodeID": nid, "NodeManagerAddress": ip, "Alive": alive}


@pytest.mark.timeout(180)
def test_launch_check_probes_each_listed_node(ray_local, tmp_path, monkeypatch):
    """The real node reads the driver's marker; a listed node that cannot run the probe (here: one that does not
    exist, as a node that died after the listing) is reported blind, and the check names the key, the folder
    and that node."""
    ray = ray_local
    (here,) = [n for n in ray.nodes() if n["Alive"]]
    ghost = _node("ab" * 28, "10.9.9.9")
    assert unshared_nodes(str(tmp_path / "shared"), [here]) == []
    assert unshared_nodes(str(tmp_path / "shared"), [here, ghost]) == [ghost]
    assert not list((tmp_path / "shared").iterdir())  # the marker is removed
    monkeypatch.setattr(ray, "nodes", lambda: [here, ghost])
    from tract_dist.config import ConfigError

    with pytest.raises(ConfigError) as e:
        check_shared_storage({"cluster.storage_path": "s3://b/p", "pipeline.output_dir": str(tmp_path / "pipe")})
    msg = str(e.value)
    assert f"pipeline.output_dir={tmp_path / 'pipe'}" in msg and "1 of the cluster's 2 nodes cannot see" in msg
    assert f"10.9.9.9 (node {'ab' * 6})" in msg and "cluster.storage_path" in msg


def _actor_died():
    from ray.exceptions import ActorDiedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("rank 1 died", {1: ActorDiedError()})


def test_a_fixed_size_run_that_loses_a_node_names_it():
    head, node2 = _node("11" * 28, "10.0.0.1"), _node("22" * 28, "10.0.0.2")
    before = node_loss.alive_nodes([head, node2, _node("33" * 28, "10.0.0.3", alive=False)])
    assert set(before) == {head["NodeID"], node2["NodeID"]}
    listings = iter([[head, node2], [head, {**node2, "Alive": False}]])  # the GCS notices the death a poll later
    err = node_loss.node_lost_error(before, _actor_died(), num_workers=2, storage="s3://b/ray",
                                    list_nodes=lambda: next(listings), wait_s=5)
    assert isinstance(err, RunFailure)  # exit 1 through the CLI's error tree
    msg = str(err)
    assert f"10.0.0.2 (node {'22' * 6})" in msg and "10.0.0.1" not in msg
    assert "cluster.num_workers=2" in msg and "s3://b/ray" in msg and "cluster.min_workers" in msg
    # A node that vanished from the listing altogether counts as lost too.
    assert node_loss.lost_nodes(before, [head]) == [node2]
    # The surviving rank's collective error is usually the one Ray Train reports (seen on two nodes: gloo's
    # "Connection closed by peer" on rank 0): the lost node is still named.
    from ray.train.v2.api.exceptions import WorkerGroupError

    collateral = WorkerGroupError("rank 0", {0: RuntimeError("gloo: Connection closed by peer [127.0.0.1]:1")})
    err = node_loss.node_lost_error(before, collateral, num_workers=2, storage="x", list_nodes=lambda: [head],
                                    wait_s=0)
    assert isinstance(err, node_loss.NodeLostError) and "10.0.0.2" in str(err) and "gloo" in str(err)
    # Nothing lost (waited out), or one node: Ray Train's error stands.
    assert node_loss.node_lost_error(before, collateral, num_workers=2, storage="x",
                                     list_nodes=lambda: [head, node2], wait_s=0) is None
    assert node_loss.node_lost_error({head["NodeID"]: head}, _actor_died(), num_workers=2, storage="x",
                                     list_nodes=lambda: []) is None
    # The bounded wait for a placement after a loss: fixed-size on several nodes only.
    assert node_loss.failure_config(0, False, 2) == {"max_failures": 0,
                                                     "controller_failure_limit": node_loss.START_ATTEMPTS_AFTER_LOSS}
    assert node_loss.failure_config(3, True, 2) == {"max_failures": 3}
    assert node_loss.failure_config(3, False, 1) == {"max_failures": 3}
