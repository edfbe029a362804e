"""The Ray executor on a two-node cluster (two raylets on this machine, joined by address).

The local-instance tests (test_ray_executor.py) run the stages inside one raylet. Here the driver joins
a cluster through its address, as `--address HOST:PORT` does; tasks are scheduled on both nodes, and a
shared model and the results cross between the two nodes' object stores. Both nodes share this
machine's filesystem, as a cluster on a shared project folder does (see agd/executors.py).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from agd.config import ForestConfig
from agd.executors import make_executor
from agd.models.forest import ForestModel, train_forest

ray = pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'agd[ray]'")

FORMULAS = ["NaCl", "KCl", "NaBr", "KBr", "KI", "LiF", "MgO", "CaO", "ZnO", "GaN", "AlN", "SiO2"]
GAPS = [5.0, 6.0, 4.0, 5.0, 4.5, 8.7, 6.3, 5.7, 2.1, 1.7, 4.1, 5.6]


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a worker node with one CPU each; the driver is not connected yet."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def _predict_where(formulas: list[str], model: ForestModel, delay: float) -> tuple[np.ndarray, str]:
    """A chunk's predictions and the node that made them (slow enough that one node cannot take all)."""
    time.sleep(delay)
    return model.predict(formulas).gaps, ray.get_runtime_context().get_node_id()


def test_tasks_spread_over_both_nodes_with_a_shared_model(two_nodes):
    model = train_forest(FORMULAS, GAPS, ForestConfig(n_estimators=20, n_jobs=1), seed=0)
    chunks = [
        ["NaCl", "MgO"],
        ["LiF"],
        ["GaN", "AlN", "ZnO"],
        ["KI"],
        ["CaO"],
        ["SiO2", "KBr"],
        ["NaBr"],
        ["KCl"],
    ]
    executor = make_executor("ray", address=two_nodes.address)  # HOST:PORT, as --address passes it
    try:
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        results = executor.map(_predict_where, chunks, model, 0.5)
    finally:
        executor.close()
    assert len({node for _, node in results}) == 2  # both nodes ran tasks
    for chunk, (gaps, _) in zip(chunks, results, strict=True):  # in input order, as a local run gives
        np.testing.assert_array_equal(gaps, model.predict(chunk).gaps)
