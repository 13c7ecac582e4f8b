"""Routing topology: which experts each profile group uses, and whether routing distance follows value distance.

The paper's claim is that CuMA learns a *latent cultural topology*: groups with similar values share experts,
conflicting groups are separated, held-out groups land near their neighbours. This module makes it measurable
(``docs/analysis.md``):

1. :func:`collect_routing` runs the evaluation prompts through an adapted model under
   :func:`cuma.routing.record_gates` and pools, per recorded layer and per profile group, the dense gate vectors
   over the non-pad prompt tokens: ``mean_gate[l, g]`` (sums to 1) and ``load_share[l, g]`` (share of the top-k
   selections per expert, sums to 1).
2. The routing distance of two groups is the Jensen-Shannon divergence (base 2, in [0, 1]) of their routing
   distributions (per layer, or of the layer-averaged distribution, the "all layers" view).
3. The human distance of two groups (:func:`human_distributions`, :func:`human_distance_matrix`): per question,
   the JS divergence of the two groups' answer distributions (empirical gold answers, or for synthetic data the
   true distributions of ``truth.json`` averaged over the group's participants), averaged over the questions both
   groups answered.
4. :func:`topology_correlation`: Pearson and Spearman correlation of the two distances over group pairs.

Figures (matplotlib, Agg): expert-load heatmap, 2-D map of the groups (classical MDS on the JS distance
``sqrt(JSD)``, a metric) with held-out groups marked, average-linkage (UPGMA) dendrogram. numpy only; no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

__all__ = [
    "RoutingAccumulator",
    "RoutingStats",
    "average_linkage",
    "classical_mds",
    "collect_routing",
    "dendrogram_order",
    "expert_load_by_group",
    "group_key",
    "human_distance_matrix",
    "human_distributions",
    "js_divergence",
    "normalized_entropy",
    "pairwise_js",
    "pearson",
    "per_layer_load",
    "plot_dendrogram",
    "plot_group_map",
    "plot_load_heatmap",
    "routing_map",
    "routing_similarity",
    "select_layers",
    "spearman",
    "topology_correlation",
]

MISSING_GROUP = "(missing)"


# ------------------------------------------------------------------------------------------------- distances


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2): 0 for equal distributions, 1 for disjoint supports.
    Inputs are normalised to sum to 1 first."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    if p.shape != q.shape:
        raise ValueError(f"distributions of different lengths: {p.shape} vs {q.shape}")
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        raise ValueError("a distribution has no mass")
    p, q = p / ps, q / qs
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, min(1.0, 0.5 * kl(p) + 0.5 * kl(q)))


def pairwise_js(dists: np.ndarray) -> np.ndarray:
    """(G, G) symmetric matrix of JS divergences between the rows of ``dists`` (G, N)."""
    dists = np.asarray(dists, dtype=float)
    g = dists.shape[0]
    out = np.zeros((g, g))
    for i in range(g):
        for j in range(i + 1, g):
            out[i, j] = out[j, i] = js_divergence(dists[i], dists[j])
    return out


def normalized_entropy(p: Sequence[float] | np.ndarray) -> float:
    """Shannon entropy of ``p`` divided by ``log N`` (1 = uniform load over the N experts, 0 = one expert)."""
    p = np.asarray(p, dtype=float)
    if p.size < 2:
        return 0.0
    p = p / p.sum()
    nz = p > 0
    return float(-np.sum(p[nz] * np.log(p[nz])) / math.log(p.size))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson correlation; None with fewer than 3 pairs or a constant input."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 3:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(xc * xc)) * float(np.sum(yc * yc)))
    if den <= 1e-300:
        return None
    return float(np.sum(xc * yc) / den)


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (Pearson of the average ranks)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 3:
        return None
    return pearson(_ranks(x), _ranks(y))


def topology_correlation(routing: np.ndarray, human: np.ndarray) -> dict[str, Any]:
    """Correlation of two (G, G) distance matrices over the group pairs ``i < j`` where both are finite."""
    routing = np.asarray(routing, dtype=float)
    human = np.asarray(human, dtype=float)
    iu = np.triu_indices(routing.shape[0], k=1)
    a, b = routing[iu], human[iu]
    ok = np.isfinite(a) & np.isfinite(b)
    return {"pairs": int(ok.sum()), "pearson": pearson(a[ok], b[ok]), "spearman": spearman(a[ok], b[ok])}


# ------------------------------------------------------------------------------------------------- human side


def group_key(record: Mapping[str, Any], group_field: str) -> str:
    """The group of a record: its profile field ``group_field`` (a top-level record key is also accepted)."""
    prof = record.get("profile") or {}
    value = prof.get(group_field, record.get(group_field))
    if value is None or value == "":
        return MISSING_GROUP
    return str(value)


def human_distributions(
    records: Sequence[Mapping[str, Any]],
    group_field: str = "country",
    source: str = "gold",
    truth: Optional[Mapping[str, Any]] = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{group: {question_id: distribution over the question's options}}``.

    ``source="gold"``: the empirical distribution of the group's gold answers. ``source="truth"`` (synthetic data):
    the mean of the true answer distributions (``truth["profiles"][profile_text]["distributions"][qid]``) over the
    group's records of that question, i.e. the expectation of the empirical distribution.
    """
    if source not in ("gold", "truth"):
        raise ValueError(f"human distribution source must be 'gold' or 'truth', got {source!r}")
    if source == "truth" and truth is None:
        raise ValueError("source='truth' needs the synthetic truth.json (only `cuma data synth` writes one)")
    sums: dict[str, dict[str, np.ndarray]] = {}
    for r in records:
        g = group_key(r, group_field)
        qid = str(r["question_id"])
        k = len(r["letters"])
        if source == "gold":
            vec = np.zeros(k)
            vec[list(r["letters"]).index(r["gold_letter"])] = 1.0
        else:
            try:
                vec = np.asarray(truth["profiles"][r["profile_text"]]["distributions"][qid], dtype=float)
            except KeyError:
                raise ValueError(f"record {r.get('id', '?')!r}: its profile / question is not in truth.json") from None
            if vec.shape != (k,):
                raise ValueError(f"record {r.get('id', '?')!r}: truth gives {vec.shape[0]} options, record has {k}")
        per_q = sums.setdefault(g, {})
        if qid in per_q:
            if per_q[qid].shape != vec.shape:
                raise ValueError(f"question {qid}: records disagree on the number of options")
            per_q[qid] = per_q[qid] + vec
        else:
            per_q[qid] = vec
    return {g: {q: v / v.sum() for q, v in qs.items()} for g, qs in sums.items()}


def human_distance_matrix(
    dists: Mapping[str, Mapping[str, np.ndarray]], groups: Sequence[str], min_questions: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-question JS divergence between groups over the questions both answered.

    Returns ``(D, shared)``: ``D`` (G, G) with NaN where fewer than ``min_questions`` questions are shared, and the
    number of shared questions per pair."""
    g = len(groups)
    d = np.full((g, g), np.nan)
    shared = np.zeros((g, g), dtype=int)
    for i in range(g):
        qi = dists.get(groups[i], {})
        d[i, i] = 0.0 if qi else np.nan
        shared[i, i] = len(qi)
        for j in range(i + 1, g):
            qj = dists.get(groups[j], {})
            common = sorted(set(qi) & set(qj))
            shared[i, j] = shared[j, i] = len(common)
            if len(common) >= max(1, min_questions):
                d[i, j] = d[j, i] = float(np.mean([js_divergence(qi[q], qj[q]) for q in common]))
    return d, shared


# ------------------------------------------------------------------------------------------------- routing side


@dataclass
class RoutingStats:
    """Gate statistics per recorded layer and per group (arrays indexed ``[layer, group, expert]``)."""

    layers: list[str]
    groups: list[str]
    mean_gate: np.ndarray  # (L, G, N): mean dense gate over the group's non-pad prompt tokens; rows sum to 1
    load_share: np.ndarray  # (L, G, N): share of top-k selections per expert; rows sum to 1
    tokens: np.ndarray  # (L, G): non-pad tokens pooled
    prompts: dict[str, int] = field(default_factory=dict)
    held_out: dict[str, bool] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return int(self.mean_gate.shape[-1])

    def routing(self, layer: Optional[int] = None) -> np.ndarray:
        """(G, N) routing distribution of each group: one layer, or (None) the mean over layers."""
        return self.mean_gate.mean(axis=0) if layer is None else self.mean_gate[layer]

    def distances(self, layer: Optional[int] = None) -> np.ndarray:
        return pairwise_js(self.routing(layer))

    def load_entropy(self) -> np.ndarray:
        """(L, G) normalised entropy of each group's mean gate vector."""
        return np.asarray([[normalized_entropy(v) for v in layer] for layer in self.mean_gate])

    def pooled_gate(self) -> np.ndarray:
        """(L, N) token-weighted mean gate over all groups."""
        w = self.tokens[..., None]
        return (self.mean_gate * w).sum(1) / np.maximum(w.sum(1), 1e-12)

    def assignment(self, layer: Optional[int] = None, top: int = 1) -> dict[str, list[int]]:
        """The ``top`` most used experts of each group (by mean gate)."""
        r = self.routing(layer)
        return {g: [int(i) for i in np.argsort(-r[k], kind="stable")[:top]] for k, g in enumerate(self.groups)}


def _model_device(model) -> Any:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        import torch

        return torch.device("cpu")


class RoutingAccumulator:
    """Pools recorded gates per layer and profile group, one forward at a time: the reduction behind
    :func:`collect_routing`, usable inside any pass that records its gates (e.g. an evaluation pass under
    :func:`cuma.routing.record_gates`, so the routing map costs no forward of its own).

    ``records``: every record that will be fed (they fix the groups, their prompt counts and held-out flags)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], group_field: str = "country") -> None:
        self.group_field = group_field
        self.prompts: dict[str, int] = {}
        self.held: dict[str, bool] = {}
        for r in records:
            g = group_key(r, group_field)
            self.prompts[g] = self.prompts.get(g, 0) + 1
            self.held[g] = self.held.get(g, False) or bool(r.get("held_out", False))
        self.groups = sorted(self.prompts)
        self._gidx = {g: i for i, g in enumerate(self.groups)}
        self._sums: dict[str, list[np.ndarray]] = {}
        self._layers: list[str] = []

    def add_forward(self, rec, batch: Sequence[Mapping[str, Any]], attention_mask=None) -> None:
        """Pool what ``rec`` (a :class:`cuma.routing.GateRecord`) holds for ONE forward of ``batch`` (one call per
        routed layer, rows in ``batch`` order), then empty ``rec`` for the next forward. Only non-pad tokens count:
        the layer's routing mask, else ``attention_mask``."""
        import torch

        if not rec.gates:
            raise ValueError("the model has no routed layers: routing analysis needs a mixture method (cuma, ...)")
        if not self._layers:
            self._layers = rec.layer_names()
        try:
            row_group = np.asarray([self._gidx[group_key(r, self.group_field)] for r in batch])
        except KeyError as err:
            raise ValueError(f"group {err.args[0]!r} was not among the accumulator's records") from None
        for name in self._layers:
            calls = rec.gates.get(name) or []
            if len(calls) > 1:
                raise ValueError(f"{name}: {len(calls)} recorded calls for one forward (expected 1)")
            if not calls:
                continue
            g = calls[0].float()  # (B, T, N)
            m = rec.masks[name][0]
            if m is None:
                if attention_mask is not None and g.shape[0] == attention_mask.shape[0]:
                    m = attention_mask[:, -g.shape[1] :].bool()
                else:
                    m = torch.ones(g.shape[:2], dtype=torch.bool)
            mf = m.to(g.device).float().unsqueeze(-1)
            gate_sum = (g * mf).sum(1).cpu().numpy().astype(float)  # (B, N)
            sel_sum = ((g > 0).float() * mf).sum(1).cpu().numpy().astype(float)
            tok = mf.squeeze(-1).sum(1).cpu().numpy().astype(float)  # (B,)
            if name not in self._sums:
                n = g.shape[-1]
                self._sums[name] = [np.zeros((len(self.groups), n)), np.zeros((len(self.groups), n)),
                                    np.zeros(len(self.groups))]
            acc = self._sums[name]
            np.add.at(acc[0], row_group, gate_sum)
            np.add.at(acc[1], row_group, sel_sum)
            np.add.at(acc[2], row_group, tok)
        for name in rec.gates:  # one forward's gates at a time: memory stays flat over a long pass
            rec.gates[name].clear()
            rec.masks[name].clear()

    def stats(self) -> RoutingStats:
        layer_names = [n for n in self._layers if n in self._sums]
        if not layer_names:
            raise ValueError("no gates were pooled: nothing was routed")
        sums = self._sums
        mean_gate = np.stack([sums[n][0] / np.maximum(sums[n][2][:, None], 1e-12) for n in layer_names])
        sel = np.stack([sums[n][1] for n in layer_names])
        load_share = sel / np.maximum(sel.sum(-1, keepdims=True), 1e-12)
        tokens = np.stack([sums[n][2] for n in layer_names])
        return RoutingStats(
            layers=layer_names, groups=list(self.groups), mean_gate=mean_gate, load_share=load_share, tokens=tokens,
            prompts=dict(self.prompts), held_out=dict(self.held),
        )  # fmt: skip


def collect_routing(
    model,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    group_field: str = "country",
    profile_table: Any = None,
    profile_in_prompt: bool = True,
    batch_size: int = 16,
    limit: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> RoutingStats:
    """Forward the prompts of ``records`` with gate recording on and pool the gates per layer and group.

    ``profile_table``: (num_profiles, dim) tensor; when given, row ``record["profile_index"]`` goes to the model as
    ``profile_embeds`` (profile-routed methods). ``limit``: at most this many prompts per group (file order).
    Batches are padded on the tokenizer's ``padding_side``; only non-pad prompt tokens count (the routing mask
    that the model derives from ``attention_mask``).
    """
    import torch

    from ..data.prompts import render_prompt
    from ..routing import record_gates

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    chosen: list[Mapping[str, Any]] = []
    per_group: dict[str, int] = {}
    for r in records:
        g = group_key(r, group_field)
        if limit is not None and per_group.get(g, 0) >= limit:
            continue
        per_group[g] = per_group.get(g, 0) + 1
        chosen.append(r)
    if not chosen:
        raise ValueError("no records to route")
    acc = RoutingAccumulator(chosen, group_field)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = _model_device(model)
    model.eval()
    done = 0
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        texts = [render_prompt(r, tokenizer, profile_in_prompt=profile_in_prompt) for r in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        kwargs: dict[str, Any] = {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0), "use_cache": False}
        if profile_table is not None:
            rows = torch.as_tensor([int(r["profile_index"]) for r in batch])
            kwargs["profile_embeds"] = profile_table[rows].to(device)
        with torch.no_grad(), record_gates(model) as rec:
            try:
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **kwargs)
            except TypeError as err:
                if "logits_to_keep" not in str(err):
                    raise
                model(input_ids=ids, attention_mask=mask, **kwargs)
        acc.add_forward(rec, batch, attention_mask=mask)
        done += len(batch)
        if progress is not None:
            progress(done, len(chosen))
    return acc.stats()


def select_layers(layer_names: Sequence[str], spec: Optional[Sequence[str] | str]) -> list[int]:
    """Indices of recorded layers chosen by ``spec``: integers (negative counts from the end), or substrings of the
    layer name (every match). ``None`` / empty: first, middle and last layer."""
    n = len(layer_names)
    if n == 0:
        return []
    if not spec:
        return sorted({0, n // 2, n - 1})
    if isinstance(spec, str):
        spec = [s for s in spec.split(",") if s.strip()]
    out: list[int] = []
    for item in spec:
        item = str(item).strip()
        try:
            i = int(item)
        except ValueError:
            hits = [k for k, name in enumerate(layer_names) if item in name]
            if not hits:
                raise ValueError(f"--layers {item!r} matches none of the {n} routed layers (e.g. {layer_names[0]!r})")
            out.extend(hits)
            continue
        if not -n <= i < n:
            raise ValueError(f"--layers index {i} is out of range for {n} routed layers")
        out.append(i % n)
    return list(dict.fromkeys(out))


def short_layer_name(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``L3.q_proj``."""
    parts = name.split(".")
    if "layers" in parts:
        k = parts.index("layers")
        if k + 1 < len(parts):
            return f"L{parts[k + 1]}.{parts[-1]}"
    return ".".join(parts[-2:])


# ------------------------------------------------------------------------------------------------- geometry


def classical_mds(d: np.ndarray, dim: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS of a distance matrix: double-centred ``-D^2/2``, top eigenvectors scaled by the
    square roots of their (non-negative) eigenvalues. Returns (G, dim); missing dimensions are zero."""
    d = np.asarray(d, dtype=float)
    g = d.shape[0]
    if g == 0:
        return np.zeros((0, dim))
    d = np.where(np.isfinite(d), d, np.nanmax(np.where(np.isfinite(d), d, np.nan)) if np.isfinite(d).any() else 0.0)
    j = np.eye(g) - np.ones((g, g)) / g
    b = -0.5 * j @ (d**2) @ j
    vals, vecs = np.linalg.eigh((b + b.T) / 2)
    order = np.argsort(vals)[::-1][:dim]
    coords = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    if coords.shape[1] < dim:
        coords = np.hstack([coords, np.zeros((g, dim - coords.shape[1]))])
    # deterministic sign: the largest-magnitude coordinate of each axis is positive
    for k in range(coords.shape[1]):
        if coords[np.argmax(np.abs(coords[:, k])), k] < 0:
            coords[:, k] = -coords[:, k]
    return coords


def average_linkage(d: np.ndarray) -> np.ndarray:
    """UPGMA agglomerative clustering of a distance matrix, in scipy's linkage format: (G-1, 4) rows
    ``[cluster_a, cluster_b, height, size]``; new clusters get ids G, G+1, ...; ties broken by the smallest ids."""
    d = np.asarray(d, dtype=float).copy()
    g = d.shape[0]
    if g < 2:
        return np.zeros((0, 4))
    finite = d[np.isfinite(d)]
    d[~np.isfinite(d)] = (finite.max() if finite.size else 1.0) * 2 + 1
    active = {i: (i, 1) for i in range(g)}  # matrix row -> (cluster id, size)
    dist = {(i, j): d[i, j] for i in range(g) for j in range(i + 1, g)}
    z = []
    next_id = g
    while len(active) > 1:
        (a, b), h = min(dist.items(), key=lambda kv: (kv[1], min(active[kv[0][0]][0], active[kv[0][1]][0]), kv[0]))
        ida, na = active[a]
        idb, nb = active[b]
        z.append([min(ida, idb), max(ida, idb), h, na + nb])
        for c in list(active):
            if c in (a, b):
                continue
            dac = dist[(min(a, c), max(a, c))]
            dbc = dist[(min(b, c), max(b, c))]
            dist[(min(a, c), max(a, c))] = (na * dac + nb * dbc) / (na + nb)
            del dist[(min(b, c), max(b, c))]
        del dist[(a, b)]
        del active[b]
        active[a] = (next_id, na + nb)
        next_id += 1
    return np.asarray(z, dtype=float)


def dendrogram_order(z: np.ndarray, n: int) -> list[int]:
    """Leaf order of a linkage matrix (left to right)."""
    if n == 1 or len(z) == 0:
        return list(range(n))

    def leaves(c: int) -> list[int]:
        if c < n:
            return [c]
        row = z[c - n]
        return leaves(int(row[0])) + leaves(int(row[1]))

    return leaves(n + len(z) - 1)



# ------------------------------------------------------------------------------------------------- routing maps


def per_layer_load(stats: RoutingStats) -> dict[str, dict[str, list[float]]]:
    """``{group: {projection: [N]}}``: each group's mean gate per expert in every routed projection (expert i of one
    projection has nothing to do with expert i of another)."""
    return {c: {name: stats.mean_gate[l, k].tolist() for l, name in enumerate(stats.layers)}
            for k, c in enumerate(stats.groups)}


def routing_similarity(per_layer: Mapping[str, Mapping[str, Sequence[float]]]) -> tuple[list[str], list[list[float]]]:
    """Cosine similarity between groups of their routing (every projection's expert load, centred over groups and
    concatenated): near 1 for groups routed alike. Returns ``(sorted groups, similarity matrix)``."""
    import torch

    groups = sorted(per_layer)
    layers = sorted(next(iter(per_layer.values())))
    mat = torch.tensor([[x for name in layers for x in per_layer[g][name]] for g in groups])
    mat = torch.nn.functional.normalize(mat - mat.mean(0, keepdim=True), dim=-1)
    return groups, (mat @ mat.T).tolist()


def routing_map(stats: RoutingStats, held_out: Sequence[str] = ()) -> dict[str, Any]:
    """A routing map from pooled gates (JSON-ready): every group's expert load in the projection whose load differs
    most between groups (the clearest view of a single router), the load averaged over projections, and the groups'
    routing similarity over all projections (:func:`routing_similarity`). ``held_out``: the groups held out of
    training, recorded with the map."""
    per_layer = per_layer_load(stats)
    groups, similarity = routing_similarity(per_layer)
    spread = {name: float(stats.mean_gate[l].std(0).mean()) for l, name in enumerate(stats.layers)}
    clearest = max(spread, key=spread.get)
    return {"countries": groups, "held_out": list(held_out), "similarity": similarity, "layer": clearest,
            "load": {g: per_layer[g][clearest] for g in groups},
            "mean_load": {g: stats.mean_gate[:, k].mean(0).tolist() for k, g in enumerate(stats.groups)}}


def expert_load_by_group(model, tokenizer, records: Sequence[Mapping[str, Any]], *, group_field: str = "country",
                         profile_table: Any = None, profile_in_prompt: bool = True, per_group: int = 16,
                         per_layer: bool = False) -> dict:
    """Mean gate per expert (over non-pad tokens) for up to ``per_group`` prompts of each group: averaged over every
    routed projection (``{group: [N]}``), or one vector per projection (``per_layer``: ``{group: {projection:
    [N]}}``). ``profile_table`` None for routers that see only tokens (semantic-only)."""
    stats = collect_routing(model, tokenizer, records, group_field=group_field, profile_table=profile_table,
                            profile_in_prompt=profile_in_prompt, limit=per_group)
    if per_layer:
        return per_layer_load(stats)
    return {g: stats.mean_gate[:, k].mean(0).tolist() for k, g in enumerate(stats.groups)}

# ------------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_load_heatmap(stats: RoutingStats, layer_indices: Sequence[int], path, title: str = "") -> str:
    """One panel per chosen layer: groups x experts, colour = mean gate share (held-out groups marked with *)."""
    plt = _plt()
    layer_indices = list(layer_indices) or [0]
    k = len(layer_indices)
    g, n = len(stats.groups), stats.num_experts
    fig, axes = plt.subplots(1, k, figsize=(max(3.0, 0.45 * n + 2.2) * k, max(2.5, 0.32 * g + 1.5)), squeeze=False,
                             layout="constrained")
    labels = [f"{x}*" if stats.held_out.get(x) else x for x in stats.groups]
    vmax = float(stats.mean_gate[layer_indices].max()) or 1.0
    im = None
    for ax, li in zip(axes[0], layer_indices):
        im = ax.imshow(stats.mean_gate[li], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(short_layer_name(stats.layers[li]), fontsize=9)
        ax.set_xticks(range(n))
        ax.set_xlabel("expert")
        ax.set_yticks(range(g))
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * g, fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="mean gate")
    fig.suptitle(title or "expert load per group (* = held out)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_group_map(
    coords: np.ndarray, groups: Sequence[str], held_out: Mapping[str, bool], path, title: str = ""
) -> str:
    """Scatter of the groups in 2-D (classical MDS); held-out groups drawn as red stars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for (x, y), gname in zip(coords, groups):
        ho = bool(held_out.get(gname))
        ax.scatter([x], [y], marker="*" if ho else "o", s=160 if ho else 50, c="tab:red" if ho else "tab:blue")
        ax.annotate(gname, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_title(title or "groups by routing distance (red star = held out)", fontsize=10)
    ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_dendrogram(z: np.ndarray, labels: Sequence[str], path, title: str = "", held_out=None) -> str:
    """Draw a linkage matrix as a dendrogram (leaves at the bottom, height = merge distance)."""
    plt = _plt()
    n = len(labels)
    order = dendrogram_order(z, n)
    xpos: dict[int, float] = {leaf: float(i) for i, leaf in enumerate(order)}
    ypos: dict[int, float] = {leaf: 0.0 for leaf in range(n)}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * n + 1.5), 4.0))
    for k, (a, b, h, _) in enumerate(z):
        a, b = int(a), int(b)
        xa, xb, ya, yb = xpos[a], xpos[b], ypos[a], ypos[b]
        ax.plot([xa, xa, xb, xb], [ya, h, h, yb], color="tab:blue", lw=1.2)
        xpos[n + k], ypos[n + k] = 0.5 * (xa + xb), float(h)
    held_out = held_out or {}
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{labels[i]}*" if held_out.get(labels[i]) else labels[i] for i in order], rotation=60,
                       ha="right", fontsize=8)  # fmt: skip
    ax.set_xlim(-0.5, n - 0.5)
    top = float(z[:, 2].max()) if len(z) else 1.0
    ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
    ax.set_ylabel("JS distance (average linkage)")
    ax.set_title(title or "groups by routing distance (* = held out)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
