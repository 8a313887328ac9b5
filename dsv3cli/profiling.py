"""Expert-load profiling: record the routed experts' choices, measure imbalance, plan replicas.

Three parts, each usable alone:
- `RouteCounter`: the model's `route_observer`. It adds each MoE layer's top-k choices into
  on-device counters (no host sync per layer), plus how many expert groups / nodes each token's
  experts span. `profile_tokens` drives a loaded model over token lists with it.
- metrics on plain numpy loads: MaxVio, balancedness over GPUs, coefficient of variation,
  normalised entropy, hottest / coldest experts, group spread.
- `plan_placement`: replicate the hottest experts and pack physical experts onto GPUs
  (hierarchically: groups to nodes, then replicas and GPUs inside a node; or globally), giving a
  physical-to-logical expert map per layer.

Boundary: no file formats of checkpoints and no CLI here (the command renders); the model is
only touched through `route_observer` and `forward`. torch is imported lazily, so the metrics and
the planner work without it.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DsvError, UsageError
from .render import plural

# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


class RouteCounter:
    """A `route_observer`: counts, per MoE layer, the tokens each routed expert receives.

    Under expert/tensor parallelism every rank routes the same tokens, so each rank counts only the
    choices that land in its own slice of experts (`expert_range`) and only rank 0 records the
    per-token spreads; an all_reduce sum then gives exactly the single-process numbers.
    """

    def __init__(self, moe_layers: Sequence[int], n_experts: int, n_group: int, *, nodes: int = 1,
                 device: Any = "cpu", expert_range: tuple[int, int] | None = None, count_spread: bool = True):
        import torch

        self.moe_layers = list(moe_layers)
        self.row = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.n_experts, self.n_group, self.nodes = n_experts, n_group, nodes
        self.lo, self.hi = expert_range or (0, n_experts)
        self.count_spread = count_spread
        L = len(self.moe_layers)
        kw = dict(dtype=torch.int64, device=device)
        self.counts = torch.zeros(L, n_experts, **kw)
        self.counts_nobias = torch.zeros(L, n_experts, **kw)
        self.saw_nobias = False
        # histograms: index s = number of groups (nodes) a token's experts span
        self.group_hist = torch.zeros(L, n_group + 1, **kw)
        self.node_hist = torch.zeros(L, nodes + 1, **kw)
        # expert -> node for the default contiguous EP layout
        self.node_of = (torch.arange(n_experts, device=device) * nodes) // n_experts

    def _add(self, counts, idx, w) -> None:
        # idx [N, k] expert ids, w [N] 0/1 token weights; scatter_add keeps it on device (no sync)
        flat = idx.reshape(-1)  # [N*k]
        ww = w[:, None].expand_as(idx).reshape(-1)  # [N*k]
        if (self.lo, self.hi) != (0, self.n_experts):
            ww = ww * ((flat >= self.lo) & (flat < self.hi)).to(ww.dtype)
        counts.scatter_add_(0, flat, ww)

    def _span(self, hist, which, buckets: int, w) -> None:
        # which [N, k] bucket ids -> how many distinct buckets each token touches
        import torch

        hit = torch.zeros(which.shape[0], buckets, dtype=torch.int64, device=which.device)
        hit.scatter_(1, which, 1)
        hist.scatter_add_(0, hit.sum(1), w)  # [N] spans in 1..buckets

    def __call__(self, layer_idx: int, topk_idx, topk_idx_nobias=None, valid=None) -> None:
        import torch

        row = self.row.get(layer_idx)
        if row is None:  # an MoE layer we were not asked about (e.g. the MTP layer)
            return
        idx = topk_idx.long()
        w = torch.ones(idx.shape[0], dtype=torch.int64, device=idx.device) if valid is None else valid.to(torch.int64)
        self._add(self.counts[row], idx, w)
        if topk_idx_nobias is not None:
            self.saw_nobias = True
            self._add(self.counts_nobias[row], topk_idx_nobias.long(), w)
        if self.count_spread:
            per_group = self.n_experts // self.n_group
            self._span(self.group_hist[row], idx // per_group, self.n_group, w)
            self._span(self.node_hist[row], self.node_of[idx], self.nodes, w)

    def reduce(self, group: Any = None) -> None:
        """Sum every counter over the ranks of `group` (call on all ranks)."""
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([int(self.saw_nobias)], device=self.counts.device)
        for t in (self.counts, self.counts_nobias, self.group_hist, self.node_hist, flag):
            tdist.all_reduce(t, group=group)
        self.saw_nobias = bool(flag.item())


@dataclass
class Profile:
    """What a profiling run measured (all counts are plain numpy)."""

    moe_layers: list[int]
    counts: np.ndarray  # [L, E] tokens routed to each expert
    counts_nobias: np.ndarray | None  # [L, E] the same without the correction bias, if asked
    group_hist: np.ndarray  # [L, n_group+1] tokens by number of groups their experts span
    node_hist: np.ndarray  # [L, nodes+1] tokens by number of nodes (contiguous EP layout)
    tokens: int
    prompts: int
    k: int
    n_group: int
    topk_group: int
    nodes: int = 1
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_counter(cls, c: RouteCounter, *, tokens: int, prompts: int, k: int, topk_group: int) -> "Profile":
        return cls(
            moe_layers=c.moe_layers, counts=c.counts.cpu().numpy(),
            counts_nobias=c.counts_nobias.cpu().numpy() if c.saw_nobias else None,
            group_hist=c.group_hist.cpu().numpy(), node_hist=c.node_hist.cpu().numpy(),
            tokens=tokens, prompts=prompts, k=k, n_group=c.n_group, topk_group=topk_group, nodes=c.nodes,
        )


def check_tokens(token_lists: Sequence[Sequence[int]], vocab_size: int, source: str = "--prompt-ids") -> None:
    if not token_lists or all(len(t) == 0 for t in token_lists):
        raise DsvError(f"{source}: no tokens to profile; give at least one non-empty prompt")
    for i, toks in enumerate(token_lists):
        bad = [t for t in toks if not 0 <= int(t) < vocab_size]
        if bad:  # an option's value, as in generate: a usage error
            raise UsageError(f"{source}: prompt {i + 1} has token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
                           "use ids from this checkpoint's tokenizer")


def profile_tokens(model, cfg, token_lists: Sequence[Sequence[int]], *, dist: Any = None, device: Any = "cpu",
                   nodes: int = 1, compare_bias: bool = False, batch_size: int = 1,
                   on_batch: Callable[[int], None] | None = None) -> Profile:
    """Prefill every token list through `model` with a RouteCounter attached; counts summed over ranks.

    Prompts go `batch_size` at a time, right-padded; `valid` tells the observer which are padding.
    """
    import torch

    if not cfg.moe_layers:
        raise DsvError("checkpoint has no MoE layers (n_routed_experts is 0 or first_k_dense_replace >= "
                       "num_hidden_layers): every layer is dense, there is no expert load to profile")
    check_tokens(token_lists, cfg.vocab_size)
    rank = getattr(dist, "rank", 0)
    world = getattr(dist, "world_size", 1)
    E = cfg.n_routed_experts
    per_rank = -(-E // world)
    counter = RouteCounter(cfg.moe_layers, E, cfg.n_group, nodes=nodes, device=device,
                           expert_range=(rank * per_rank, min(E, (rank + 1) * per_rank)), count_spread=rank == 0)
    lists = [list(map(int, t)) for t in token_lists if len(t)]

    def observe(layer_idx, topk_idx, topk_nobias=None, valid=None):
        counter(layer_idx, topk_idx, topk_nobias if compare_bias else None, valid)

    old = model.route_observer
    model.route_observer = observe
    try:
        with torch.inference_mode():
            for i in range(0, len(lists), batch_size):
                chunk = lists[i:i + batch_size]
                T = max(len(t) for t in chunk)
                toks = torch.zeros(len(chunk), T, dtype=torch.long)  # [B,T] right-padded
                valid = torch.zeros(len(chunk), T, dtype=torch.bool)  # [B,T]
                for b, t in enumerate(chunk):
                    toks[b, :len(t)] = torch.tensor(t)
                    valid[b, :len(t)] = True
                model.forward(toks.to(device), torch.zeros(len(chunk), dtype=torch.long, device=device),
                              valid=None if bool(valid.all()) else valid.to(device))
                if on_batch is not None:
                    on_batch(len(chunk))
    finally:
        model.route_observer = old
    if world > 1:
        counter.reduce(getattr(dist, "group", None))
    return Profile.from_counter(counter, tokens=sum(len(t) for t in lists), prompts=len(lists),
                                k=cfg.num_experts_per_tok, topk_group=cfg.topk_group)


# ---------------------------------------------------------------------------------------------
# Metrics (numpy; a "load" is a vector of token counts)
# ---------------------------------------------------------------------------------------------


def maxvio(load: np.ndarray) -> float:
    """(max − mean) / mean over experts; 0 for an empty load."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    return float(load.max() / mean - 1.0) if mean > 0 else 0.0


def cv(load: np.ndarray) -> float:
    """Coefficient of variation: population std / mean."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else 0.0


def normalised_entropy(load: np.ndarray) -> float:
    """Entropy of the load distribution over experts divided by log(E): 1 = perfectly even."""
    load = np.asarray(load, dtype=np.float64)
    total = load.sum()
    if total <= 0 or load.size < 2:
        return 1.0
    p = load[load > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(load.size))


def balancedness(gpu_load: np.ndarray) -> float:
    """mean / max of the per-GPU load: 1 = every GPU equally busy."""
    gpu_load = np.asarray(gpu_load, dtype=np.float64)
    mx = gpu_load.max()
    return float(gpu_load.mean() / mx) if mx > 0 else 1.0


def default_layout(n_experts: int, gpus: int) -> np.ndarray:
    """GPU of each expert in the plain EP layout without replicas: contiguous blocks."""
    return (np.arange(n_experts) * gpus) // n_experts


def gpu_loads(load: np.ndarray, phy2log: np.ndarray, gpus: int) -> np.ndarray:
    """Per-GPU load of one layer: physical slot p sits on GPU p // (P / gpus); an expert's load
    is split evenly among its replicas."""
    load = np.asarray(load, dtype=np.float64)
    phy2log = np.asarray(phy2log)
    reps = np.bincount(phy2log, minlength=load.size)
    share = load[phy2log] / reps[phy2log]  # [P]
    return share.reshape(gpus, -1).sum(1)


def unplanned_gpu_loads(load: np.ndarray, gpus: int) -> np.ndarray:
    return np.bincount(default_layout(len(load), gpus), weights=np.asarray(load, np.float64), minlength=gpus)


def spread_stats(hist: np.ndarray, limit: int | None = None) -> dict[str, float]:
    """Mean and max of a span histogram (index = number of groups/nodes spanned) and, given a
    limit such as topk_group, the share of tokens that span exactly that many."""
    hist = np.asarray(hist)
    n = hist.sum()
    out: dict[str, float] = {"mean": 0.0, "max": 0}
    if n:
        spans = np.arange(hist.size)
        out = {"mean": float((hist * spans).sum() / n), "max": int(spans[hist > 0].max())}
    if limit is not None:
        out["at_limit"] = float(hist[limit] / n) if n and limit < hist.size else 0.0
    return out


def layer_metrics(load: np.ndarray, gpus: int, top: int = 3) -> dict[str, Any]:
    load = np.asarray(load)
    order = np.argsort(-load, kind="stable")
    hot = [[int(e), int(load[e])] for e in order[:top]]
    cold = [[int(e), int(load[e])] for e in order[::-1][:top]]
    return {
        "maxvio": maxvio(load), "cv": cv(load), "entropy": normalised_entropy(load),
        "balancedness": balancedness(unplanned_gpu_loads(load, gpus)),
        "hottest": hot, "coldest": cold,
    }


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


def check_layout(n_experts: int, n_group: int, gpus: int, nodes: int, redundant: int) -> None:
    """UsageError naming the first constraint that does not hold."""
    if gpus < 1 or nodes < 1 or redundant < 0:
        raise UsageError("--gpus and --nodes must be ≥ 1 and --redundant ≥ 0")
    if gpus % nodes:
        raise UsageError(f"--gpus {gpus} % --nodes {nodes} != 0: every node needs the same number of GPUs")
    if (n_experts + redundant) % gpus:
        raise UsageError(f"(n_routed_experts + --redundant) % --gpus != 0: ({n_experts} + {redundant}) % {gpus} = "
                         f"{(n_experts + redundant) % gpus}; every GPU must hold the same number of physical experts")


def replicate(load: np.ndarray, extra: int) -> np.ndarray:
    """Copies per expert after giving `extra` replicas, one at a time, to the expert whose
    per-copy load is highest (this minimises the largest per-copy load)."""
    load = np.asarray(load, dtype=np.float64)
    reps = np.ones(load.size, dtype=np.int64)
    heap = [(-w, e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(extra):
        _, e = heapq.heappop(heap)
        reps[e] += 1
        heapq.heappush(heap, (-load[e] / reps[e], e))
    return reps


def pack(weights: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each item, every bin holding exactly len(weights)/bins items: heaviest first into the
    lightest bin with room, then pairwise swaps while they lower the heaviest bin."""
    w = np.asarray(weights, dtype=np.float64)
    per = w.size // bins
    where = np.empty(w.size, dtype=np.int64)
    load = np.zeros(bins)
    room = np.full(bins, per)
    for i in np.argsort(-w, kind="stable"):
        b = int(np.argmin(np.where(room > 0, load, np.inf)))
        where[i] = b
        load[b] += w[i]
        room[b] -= 1
    for _ in range(4 * w.size):  # swap refinement; each accepted swap strictly lowers one max bin
        hi = int(np.argmax(load))
        a = np.flatnonzero(where == hi)
        best = None
        for b in range(bins):
            if b == hi:
                continue
            c = np.flatnonzero(where == b)
            d = w[a][:, None] - w[c][None, :]  # [per, per] load moved from hi to b
            new_max = np.maximum(load[hi] - d, load[b] + d)
            new_max[d <= 0] = np.inf
            j = np.unravel_index(np.argmin(new_max), new_max.shape)
            if new_max[j] < load[hi] - 1e-9 and (best is None or new_max[j] < best[0]):
                best = (new_max[j], a[j[0]], c[j[1]], b, d[j])
        if best is None:
            break
        _, i, k, b, moved = best
        where[i], where[k] = b, hi
        load[hi] -= moved
        load[b] += moved
    return where


def _pack_replicas(load: np.ndarray, experts: np.ndarray, extra: int, gpus: int) -> np.ndarray:
    """Physical slots (logical ids, GPU-major) for `experts` with `extra` replicas over `gpus` GPUs."""
    reps = replicate(load[experts], extra)
    items = np.repeat(experts, reps)  # [P] logical id of each copy
    share = load[items] / np.repeat(reps, reps)
    where = pack(share, gpus)
    order = np.lexsort((items, where))  # GPU-major, then expert id for a stable map
    return items[order]


def _safe_plan(load: np.ndarray, gpus: int, nodes: int, redundant: int) -> np.ndarray:
    """The unplanned layout plus replicas that can only lower the busiest GPU: a GPU holding
    originals gets extra copies of its own experts (its load is unchanged), an empty GPU gets all
    its copies of one expert of its node (its load ≤ that expert's load ≤ the old maximum)."""
    E = load.size
    per = (E + redundant) // gpus
    home = default_layout(E, gpus)
    gpn = gpus // nodes
    slots, used = [], set()
    for g in range(gpus):
        own = np.flatnonzero(home == g)
        if own.size:
            hot = own[np.argmax(load[own])]
            slots.append(np.concatenate([own, np.full(per - own.size, hot)]))
        else:
            node = g // gpn
            cand = [e for e in np.argsort(-load, kind="stable") if home[e] // gpn == node]
            e = next((e for e in cand if e not in used), cand[0] if cand else int(np.argmax(load)))
            used.add(int(e))
            slots.append(np.full(per, e))
    return np.concatenate(slots).astype(np.int64)


def _layer_plan(load: np.ndarray, n_group: int, gpus: int, nodes: int, redundant: int,
                hierarchical: bool) -> np.ndarray:
    E = load.size
    if not hierarchical:
        return _pack_replicas(load, np.arange(E), redundant, gpus)
    per_group = E // n_group
    group_load = load.reshape(n_group, per_group).sum(1)
    node_of_group = pack(group_load, nodes)
    out = []
    for n in range(nodes):
        groups = np.flatnonzero(node_of_group == n)
        experts = (groups[:, None] * per_group + np.arange(per_group)[None, :]).reshape(-1)
        out.append(_pack_replicas(load, experts, redundant // nodes, gpus // nodes))
    return np.concatenate(out)


@dataclass
class Plan:
    gpus: int
    nodes: int
    redundant: int
    method: str  # "hierarchical" or "global"
    phy2log: np.ndarray  # [L, E+R] logical expert of each physical slot; slot p is on GPU p // ((E+R)/gpus)
    before: np.ndarray  # [L] balancedness of the unplanned layout
    after: np.ndarray  # [L] balancedness of the plan
    chosen: list[str]  # per layer: which candidate won ("planned" or "kept")

    def to_json(self, moe_layers: Sequence[int]) -> dict[str, Any]:
        P = self.phy2log.shape[1]
        return {
            "gpus": self.gpus, "nodes": self.nodes, "redundant": self.redundant, "method": self.method,
            "physical_experts_per_gpu": P // self.gpus,
            "layers": {
                str(layer): {
                    "physical_to_logical": self.phy2log[i].tolist(),
                    "replicas": np.bincount(self.phy2log[i], minlength=P - self.redundant).tolist(),
                    "balancedness_before": float(self.before[i]), "balancedness_after": float(self.after[i]),
                }
                for i, layer in enumerate(moe_layers)
            },
        }


def plan_placement(counts: np.ndarray, *, n_group: int, gpus: int, nodes: int, redundant: int) -> Plan:
    """Replica placement for every layer of `counts` [L, E].

    Hierarchical when the groups divide evenly over the nodes (and the replicas too), so a token
    limited to `topk_group` groups also reaches few nodes; global otherwise. The plan never has a
    lower balancedness than the unplanned layout: where the greedy plan would, a conservative one
    (the unplanned layout plus harmless replicas) is kept instead.
    """
    counts = np.asarray(counts, dtype=np.float64)
    L, E = counts.shape
    check_layout(E, n_group, gpus, nodes, redundant)
    hierarchical = nodes > 1 and n_group % nodes == 0 and redundant % nodes == 0
    maps, before, after, chosen = [], [], [], []
    for load in counts:
        b0 = balancedness(unplanned_gpu_loads(load, gpus))
        planned = _layer_plan(load, n_group, gpus, nodes, redundant, hierarchical)
        b1 = balancedness(gpu_loads(load, planned, gpus))
        if b1 + 1e-12 < b0:
            planned = _safe_plan(load, gpus, nodes, redundant)
            b1 = balancedness(gpu_loads(load, planned, gpus))
            chosen.append("kept")
        else:
            chosen.append("planned")
        maps.append(planned)
        before.append(b0)
        after.append(b1)
    return Plan(gpus, nodes, redundant, "hierarchical" if hierarchical else "global",
                np.stack(maps), np.array(before), np.array(after), chosen)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def summarize(p: Profile, *, gpus: int, nodes: int, redundant: int) -> dict[str, Any]:
    """One JSON-able document: counts, per-layer and overall metrics, and the placement plan."""
    plan = plan_placement(p.counts, n_group=p.n_group, gpus=gpus, nodes=nodes, redundant=redundant)
    layers = []
    for i, layer in enumerate(p.moe_layers):
        m = layer_metrics(p.counts[i], gpus)
        m["layer"] = layer
        m["balancedness_planned"] = float(plan.after[i])
        m["group_spread"] = spread_stats(p.group_hist[i], p.topk_group)
        m["node_spread"] = spread_stats(p.node_hist[i])
        if p.counts_nobias is not None:
            m["nobias"] = {"maxvio": maxvio(p.counts_nobias[i]), "cv": cv(p.counts_nobias[i]),
                           "entropy": normalised_entropy(p.counts_nobias[i]),
                           "balancedness": balancedness(unplanned_gpu_loads(p.counts_nobias[i], gpus))}
        layers.append(m)

    def avg(key, src=layers):
        return float(np.mean([m[key] for m in src]))

    overall = {
        "maxvio_mean": avg("maxvio"), "maxvio_max": float(max(m["maxvio"] for m in layers)),
        "maxvio_total": maxvio(p.counts.sum(0)),
        "cv_mean": avg("cv"), "entropy_mean": avg("entropy"),
        "balancedness_mean": avg("balancedness"), "balancedness_min": float(min(m["balancedness"] for m in layers)),
        "balancedness_planned_mean": float(plan.after.mean()),
        "balancedness_planned_min": float(plan.after.min()),
        "group_spread": spread_stats(p.group_hist.sum(0), p.topk_group), "node_spread": spread_stats(p.node_hist.sum(0)),
        "topk_group": p.topk_group, "n_group": p.n_group,
    }
    if p.counts_nobias is not None:
        nb = [m["nobias"] for m in layers]
        overall["nobias"] = {"maxvio_mean": avg("maxvio", nb), "cv_mean": avg("cv", nb),
                             "entropy_mean": avg("entropy", nb), "balancedness_mean": avg("balancedness", nb)}
    doc = {
        "moe_layers": list(p.moe_layers), "tokens": p.tokens, "prompts": p.prompts,
        "num_experts_per_tok": p.k, "n_routed_experts": int(p.counts.shape[1]),
        "layout": {"gpus": gpus, "nodes": nodes, "redundant": redundant},
        "counts": p.counts.astype(int).tolist(),
        "metrics": {"layers": layers, "overall": overall},
        "plan": plan.to_json(p.moe_layers),
    }
    if p.counts_nobias is not None:
        doc["counts_nobias"] = p.counts_nobias.astype(int).tolist()
    doc.update(p.extra)
    return doc


def default_gpus(n_experts: int, redundant: int) -> int:
    """One node of up to 8 GPUs that divides the physical experts."""
    return math.gcd(n_experts + redundant, 8) or 1


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    """Fail before the long run when --out cannot be written."""
    if out.exists() and not out.is_dir():
        raise DsvError(f"--out {out}: exists and is not a folder; give a folder (it gets counts.json, plan.json, ...)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".dsv3-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DsvError(f"--out {out}: not writable ({e.strerror or e}); choose another folder") from e


def _write_atomic(path: Path, data: bytes) -> None:
    from .checkpoint import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def counts_csv(moe_layers: Sequence[int], counts: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer"] + [f"e{e}" for e in range(counts.shape[1])])
    for layer, row in zip(moe_layers, counts):
        w.writerow([layer] + [int(x) for x in row])
    return buf.getvalue()


def heatmap_png(moe_layers: Sequence[int], counts: np.ndarray, title: str) -> bytes:
    """Layers × experts, colour = load / layer mean (1 = even)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DsvError("heatmap.png needs matplotlib: pip install 'dsv3[plot]' (or pass --no-heatmap)") from e
    counts = np.asarray(counts, dtype=np.float64)
    rel = counts / np.maximum(counts.mean(1, keepdims=True), 1e-12)  # [L, E]
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(min(max(6, E / 16 + 2), 20), min(max(3, L * 0.18 + 1.5), 14)), dpi=120)
    # a single very hot expert would wash out the rest: saturate above the 99.5th percentile
    vmax = max(2.0, float(np.percentile(rel, 99.5)))
    im = ax.imshow(rel, aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=vmax)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    step = max(1, L // 20)
    ax.set_yticks(range(0, L, step))
    ax.set_yticklabels([str(moe_layers[i]) for i in range(0, L, step)])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="tokens / layer mean", extend="max" if rel.max() > vmax else "neither")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _dumps(obj: Any) -> str:
    """Indented JSON with every list of numbers on one line (a layer's map stays readable)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-\d.e,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)


def write_outputs(out: Path, doc: dict[str, Any], *, heatmap: bool = True) -> list[Path]:
    """counts.json, counts.csv (and counts_nobias.csv), plan.json, heatmap.png; each written atomically."""
    layers = doc["moe_layers"]
    counts = np.asarray(doc["counts"])
    files = {
        "counts.json": _dumps({k: doc[k] for k in ("moe_layers", "tokens", "prompts", "num_experts_per_tok",
                                                        "n_routed_experts", "counts", "metrics")
                                   if k in doc} | ({"counts_nobias": doc["counts_nobias"]} if "counts_nobias" in doc else {}),
                                  ).encode(),
        "counts.csv": counts_csv(layers, counts).encode(),
        "plan.json": _dumps(doc["plan"]).encode(),
    }
    if "counts_nobias" in doc:
        files["counts_nobias.csv"] = counts_csv(layers, np.asarray(doc["counts_nobias"])).encode()
    if heatmap:
        files["heatmap.png"] = heatmap_png(layers, counts, f"expert load, {doc['tokens']} tokens")
    written = []
    for name, data in files.items():
        _write_atomic(out / name, data)
        written.append(out / name)
    return written


# ---------------------------------------------------------------------------------------------
# The whole run (what the command calls)
# ---------------------------------------------------------------------------------------------


@dataclass
class ProfileRequest:
    checkpoint: Path
    prompts_file: Path | None = None
    prompt_ids: list[list[int]] = field(default_factory=list)
    generate: int = 0
    raw: bool = False
    compare_bias: bool = False
    gpus: int | None = None
    nodes: int = 1
    redundant: int = 0
    batch_size: int = 4
    dtype: str = "auto"
    device: str = "auto"
    out: Path | None = None
    heatmap: bool = True
    force: bool = False  # skip the memory preflight


def run_profile(req: ProfileRequest, *, progress: Callable[[str, int], Callable[[int], None]] | None = None,
                dist: Any = None, warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Load, route the prompts, and return the summary document (rank 0; None on other ranks).

    `progress(description, total)` returns an `advance(n)` callable (the command draws a bar).
    Inputs are checked before the model is loaded, so bad input fails in a second.
    """
    from .checkpoint import Checkpoint

    if req.prompts_file is None and not req.prompt_ids:
        raise UsageError("give prompts with --prompts FILE or --prompt-ids 1,2,3")
    if req.prompts_file is not None and req.prompt_ids:
        raise UsageError("--prompts and --prompt-ids are exclusive; give one of them")
    if req.generate < 0 or req.batch_size < 1:
        raise UsageError("--generate must be ≥ 0 and --batch-size ≥ 1")
    ck = Checkpoint(req.checkpoint)
    cfg = ck.config
    if not cfg.moe_layers:
        raise DsvError(f"{req.checkpoint}: no MoE layers (n_routed_experts is {cfg.n_routed_experts}, "
                       f"first_k_dense_replace {cfg.first_k_dense_replace} of {plural(cfg.num_hidden_layers, 'layer')}): "
                       "a dense-only checkpoint has no expert load to profile")
    E = cfg.n_routed_experts
    gpus = req.gpus if req.gpus is not None else default_gpus(E, req.redundant)
    check_layout(E, cfg.n_group, gpus, req.nodes, req.redundant)
    if req.compare_bias and cfg.topk_method != "noaux_tc":
        raise UsageError(f"--compare-bias: this checkpoint routes with {cfg.topk_method!r}, which has no correction bias")
    if req.prompts_file is not None:
        from .prompts import encode, read_prompts_file
        from .tokenizer import load_tokenizer

        pf = Path(req.prompts_file)
        messages = read_prompts_file(pf)
        tok = load_tokenizer(req.checkpoint)
        token_lists = [encode(tok, m, req.raw) for m in messages]
        source = f"--prompts {pf}"
    else:
        token_lists = [list(t) for t in req.prompt_ids]
        source = "--prompt-ids"
    check_tokens(token_lists, cfg.vocab_size, source)
    if req.out is not None:
        check_out_dir(Path(req.out))
        if req.heatmap:
            try:
                import matplotlib  # noqa: F401 - only checking it is there before the long run
            except ImportError as e:
                raise DsvError("--out writes heatmap.png, which needs matplotlib: pip install 'dsv3[plot]' "
                               "(or pass --no-heatmap)") from e

    from .loading import compute_dtype, load_model
    from .parallel import Dist, resolve_device

    dist = dist or Dist()
    device = resolve_device(req.device)
    dtype = compute_dtype(ck, req.dtype)
    max_len = max(len(t) for t in token_lists) + req.generate
    if warn is not None and (warning := cfg.past_context(max_len, f"the longest prompt + --generate {req.generate}")):
        warn(warning)
    batch = min(req.batch_size, len(token_lists))
    model = load_model(ck, dist, dtype=dtype, device=device, max_batch_size=batch, max_seq_len=max(max_len, 16), mtp=False,
                       check_memory=not req.force)
    extra: dict[str, Any] = {"source": source}
    if req.generate:
        from .generation import generate

        advance = progress("generating", len(token_lists)) if progress else None
        full = []
        for i in range(0, len(token_lists), batch):
            chunk = token_lists[i:i + batch]
            # no EOS: every prompt gets exactly --generate new tokens
            out, _ = generate(model, chunk, max_new_tokens=req.generate, max_seq_len=max_len, dist=dist)
            full += [p + o for p, o in zip(chunk, out)]
            if advance:
                advance(len(chunk))
        extra["generated_tokens"] = sum(len(f) - len(p) for f, p in zip(full, token_lists))
        token_lists = full
    advance = progress("routing", len(token_lists)) if progress else None
    prof = profile_tokens(model, model.cfg, token_lists, dist=dist, device=device, nodes=req.nodes,
                          compare_bias=req.compare_bias, batch_size=batch, on_batch=advance)
    if dist.rank != 0:
        return None
    prof.extra = extra
    doc = summarize(prof, gpus=gpus, nodes=req.nodes, redundant=req.redundant)
    doc["checkpoint"] = str(req.checkpoint)
    doc["dtype"] = str(dtype).replace("torch.", "")
    doc["device"] = device
    doc["world_size"] = dist.world_size
    if req.out is not None:
        doc["files"] = [str(p) for p in write_outputs(Path(req.out), doc, heatmap=req.heatmap)]
    return doc
