"""profiling.py: metrics on hand-computed loads, the observer's counters, and the placement planner
(never lowers balancedness on random profiles; reaches the known optimum on constructed ones).
The end-to-end count check against transformers' router lives in test_profile_cli.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsv3cli import profiling as P
from dsv3cli.errors import UsageError

# ---------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    assert P.maxvio([1, 1, 1, 1]) == 0 and P.cv([1, 1, 1, 1]) == 0 and P.normalised_entropy([1, 1, 1, 1]) == 1
    assert P.maxvio([4, 0, 0, 0]) == pytest.approx(3.0)
    assert P.cv([4, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert P.normalised_entropy([4, 0, 0, 0]) == 0
    assert P.maxvio([3, 1, 2, 2]) == pytest.approx(0.5)
    assert P.cv([3, 1, 2, 2]) == pytest.approx(math.sqrt(0.5) / 2)
    h = -(0.375 * math.log(0.375) + 0.125 * math.log(0.125) + 0.5 * math.log(0.25)) / math.log(4)
    assert P.normalised_entropy([3, 1, 2, 2]) == pytest.approx(h)
    assert P.normalised_entropy([3, 1, 2, 2]) == pytest.approx(0.952819, abs=1e-6)
    # default EP layout over 2 GPUs: experts {0,1} and {2,3}
    assert P.balancedness(P.unplanned_gpu_loads(np.array([3, 1, 2, 2]), 2)) == 1.0
    assert P.balancedness(P.unplanned_gpu_loads(np.array([3, 1, 2, 0]), 2)) == pytest.approx(0.75)
    # replicas split an expert's load evenly: expert 0 has three copies of 2
    assert P.gpu_loads(np.array([6, 2]), np.array([0, 0, 1, 0]), 2).tolist() == [4.0, 4.0]
    assert P.spread_stats(np.array([0, 2, 1, 1])) == {"mean": 1.75, "max": 3}
    assert P.spread_stats(np.array([0, 2, 1, 1]), limit=2)["at_limit"] == 0.25
    m = P.layer_metrics(np.array([5, 9, 1, 7]), gpus=2, top=2)
    assert m["hottest"] == [[1, 9], [3, 7]] and m["coldest"] == [[2, 1], [0, 5]]
    assert m["balancedness"] == pytest.approx(11 / 14)  # GPUs 14 and 8


def test_route_counter_counts_valid_and_spreads():
    # 8 experts in 4 groups of 2; 2 nodes of 4 experts
    c = P.RouteCounter([3, 5], 8, 4, nodes=2)
    idx = torch.tensor([[0, 1], [0, 2], [0, 7], [6, 7]])
    valid = torch.tensor([True, True, True, False])
    c(3, idx, None, valid)
    c(5, idx, idx.flip(1), None)
    c(9, idx, None, None)  # not a profiled layer: ignored
    assert c.counts[0].tolist() == [3, 1, 1, 0, 0, 0, 0, 1]
    assert c.counts[1].tolist() == [3, 1, 1, 0, 0, 0, 1, 2]
    assert c.counts_nobias[0].sum() == 0 and c.counts_nobias[1].tolist() == c.counts[1].tolist() and c.saw_nobias
    assert c.group_hist[0].tolist() == [0, 1, 2, 0, 0]  # {0,1} one group; {0,2},{0,7} two
    assert c.node_hist[0].tolist() == [0, 2, 1]  # {0,7} spans both nodes
    assert c.group_hist[1].tolist() == [0, 2, 2, 0, 0]


def test_route_counter_expert_ranges_add_up():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(50)])  # [50, 4]
    full = P.RouteCounter([1], 16, 4)
    full(1, idx)
    parts = [P.RouteCounter([1], 16, 4, expert_range=(r * 6, min(16, r * 6 + 6)), count_spread=r == 0) for r in range(3)]
    for p in parts:
        p(1, idx)
    assert sum(p.counts for p in parts).tolist() == full.counts.tolist()
    assert sum(p.group_hist for p in parts).tolist() == full.group_hist.tolist()
    assert int(full.counts.sum()) == 50 * 4


# ---------------------------------------------------------------- placement


def _valid_map(plan, E, R):
    assert plan.phy2log.shape[1] == E + R
    for row in plan.phy2log:
        reps = np.bincount(row, minlength=E)
        assert reps.size == E and reps.min() >= 1 and reps.sum() == E + R


@pytest.mark.parametrize("E,n_group,G,N,R", [(16, 4, 4, 1, 0), (16, 4, 4, 2, 4), (16, 4, 8, 2, 8), (16, 4, 8, 4, 0),
                                           (12, 4, 8, 2, 4), (8, 4, 16, 2, 8), (24, 6, 6, 3, 6), (16, 4, 4, 4, 4)])
def test_plan_never_lowers_balancedness(E, n_group, G, N, R):
    rng = np.random.default_rng(E * 1000 + G * 10 + R)
    profiles = [rng.gamma(0.3, 50, (20, E)).round(), rng.zipf(1.5, (20, E)).clip(0, 10**6), rng.integers(0, 3, (20, E))]
    planned = 0
    for counts in profiles:
        counts[0] = 0  # an empty layer
        plan = P.plan_placement(counts, n_group=n_group, gpus=G, nodes=N, redundant=R)
        _valid_map(plan, E, R)
        assert (plan.after >= plan.before - 1e-12).all()
        for i, load in enumerate(counts):
            assert plan.after[i] == pytest.approx(P.balancedness(P.gpu_loads(load, plan.phy2log[i], G)))
        planned += plan.chosen.count("planned")
    assert planned >= 0.9 * 60  # the greedy plan itself wins almost always


@pytest.mark.parametrize("E,G,N,R", [(8, 16, 2, 8), (16, 8, 2, 0), (6, 4, 2, 2), (16, 4, 1, 4)])
def test_conservative_plan_never_lowers(E, G, N, R):
    rng = np.random.default_rng(1)
    for _ in range(50):
        load = rng.gamma(0.5, 10, E)
        before = P.balancedness(P.unplanned_gpu_loads(load, G))
        m = P._safe_plan(load, G, N, R)
        assert np.bincount(m, minlength=E).min() >= 1 and m.size == E + R
        assert P.balancedness(P.gpu_loads(load, m, G)) >= before - 1e-12


def test_plan_reaches_known_optimum_global():
    # 13 experts, 4 GPUs, 3 replicas: the hot expert (40) gets four copies of 10, one per GPU; the
    # cold ones split into triples of 20 -> every GPU carries exactly 30 (balancedness 1).
    cold = [9, 9, 9, 9, 8, 8, 7, 6, 5, 4, 3, 3]
    load = np.array([3, 9, 8, 40, 9, 3, 7, 9, 6, 5, 4, 9, 8], dtype=float)
    assert sorted(load.tolist()) == sorted(cold + [40])
    plan = P.plan_placement(load[None], n_group=1, gpus=4, nodes=1, redundant=3)
    assert plan.method == "global"
    assert plan.before[0] < 0.8
    assert plan.after[0] == pytest.approx(1.0)
    assert np.bincount(plan.phy2log[0], minlength=13)[3] == 4
    assert P.gpu_loads(load, plan.phy2log[0], 4).tolist() == [30.0] * 4


def test_plan_reaches_known_optimum_hierarchical():
    # 4 groups of 2 experts over 2 nodes of 2 GPUs, 4 replicas (2 per node). Group sums 26, 18, 18, 10:
    # the optimum puts groups {0, 3} and {1, 2} on the nodes (36 each) and, inside them,
    # 24 -> three copies of 8 with 2 | 5 5, and 12 12 -> two copies each of 6 -> 18 per GPU.
    load = np.array([24, 2, 12, 6, 12, 6, 5, 5], dtype=float)
    plan = P.plan_placement(load[None], n_group=4, gpus=4, nodes=2, redundant=4)
    assert plan.method == "hierarchical"
    assert plan.before[0] == pytest.approx(18 / 26)
    assert plan.after[0] == pytest.approx(1.0)
    # hierarchical: each node's physical experts come from exactly n_group/nodes whole groups
    m = plan.phy2log[0].reshape(2, -1)  # [node, slots]
    assert {frozenset((m[n] // 2).tolist()) for n in range(2)} == {frozenset({0, 3}), frozenset({1, 2})}


def test_hierarchical_keeps_groups_inside_nodes_random():
    rng = np.random.default_rng(3)
    counts = rng.gamma(0.4, 100, (10, 32))
    plan = P.plan_placement(counts, n_group=8, gpus=8, nodes=4, redundant=8)
    assert plan.method == "hierarchical"
    for row in plan.phy2log:
        groups_per_node = [set((r // 4).tolist()) for r in row.reshape(4, -1)]
        assert all(len(g) == 2 for g in groups_per_node)
        assert set().union(*groups_per_node) == set(range(8))


def test_layout_constraints_name_the_rule():
    with pytest.raises(UsageError, match=r"\(n_routed_experts \+ --redundant\) % --gpus != 0"):
        P.plan_placement(np.ones((1, 16)), n_group=4, gpus=6, nodes=1, redundant=0)
    with pytest.raises(UsageError, match=r"--gpus 8 % --nodes 3 != 0"):
        P.plan_placement(np.ones((1, 16)), n_group=4, gpus=8, nodes=3, redundant=0)
    with pytest.raises(UsageError, match="--redundant"):
        P.plan_placement(np.ones((1, 16)), n_group=4, gpus=8, nodes=1, redundant=-1)
    # groups that do not divide over nodes: still a plan, a global one
    assert P.plan_placement(np.ones((1, 18)), n_group=3, gpus=6, nodes=2, redundant=0).method == "global"


def test_replicate_minimises_largest_copy():
    reps = P.replicate(np.array([100.0, 10, 30, 0]), 4)
    assert reps.tolist() == [4, 1, 2, 1]  # copies: 25 25 25 25 | 10 | 15 15 | 0


def test_summarize_document():
    p = P.Profile(moe_layers=[1, 2], counts=np.array([[4, 0, 2, 2], [2, 2, 2, 2]]), counts_nobias=None,
                  group_hist=np.array([[0, 4, 0], [0, 2, 2]]), node_hist=np.array([[0, 4], [0, 4]]),
                  tokens=4, prompts=1, k=2, n_group=2, topk_group=1)
    d = P.summarize(p, gpus=2, nodes=1, redundant=0)
    assert d["moe_layers"] == [1, 2] and d["counts"][0] == [4, 0, 2, 2] and d["tokens"] == 4
    layers = d["metrics"]["layers"]
    assert layers[0]["maxvio"] == pytest.approx(1.0) and layers[1]["maxvio"] == 0
    assert d["metrics"]["overall"]["maxvio_mean"] == pytest.approx(0.5)
    assert layers[0]["group_spread"] == {"mean": 1.0, "max": 1, "at_limit": 1.0}
    assert layers[1]["group_spread"] == {"mean": 1.5, "max": 2, "at_limit": 0.5}
    assert layers[0]["balancedness"] == pytest.approx(1.0)  # GPUs {0,1}=4 and {2,3}=4
    assert set(d["plan"]["layers"]) == {"1", "2"}
