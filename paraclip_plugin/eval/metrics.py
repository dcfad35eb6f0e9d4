"""Rank-similarity metrics of paraphrased retrieval (paper, Appendix B) and recall@k.

Two ranked lists ``A`` and ``B`` (image ids retrieved for a query and for its paraphrase):

    AO@k(A, B) = 1/k * sum_{d=1..k} |A[:d] ∩ B[:d]| / d       (average overlap, Fagin et al. 2003)
    JS@k(A, B) = |A[:k] ∩ B[:k]| / |A[:k] ∪ B[:k]|           (Jaccard similarity)

When ``k`` exceeds a list, both metrics use the available prefix: the depth actually used is
``min(k, len(A), len(B))`` and AO divides by that depth, not by ``k``. So two identical lists always
score 1.0, and a gallery smaller than ``k`` (where ``torch.topk`` can return only ``num_images``
ids) is scored the same way by the per-list and the score-matrix functions. Ids within one list
must be distinct (a ranking never repeats an image); the set algebra below relies on it.
"""

import torch


def effective_depth(k, *lengths):
    """The depth the metrics use: ``k`` capped at the shortest list; ``k`` and that depth must be >= 1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    depth = min(k, *lengths)
    if depth < 1:
        raise ValueError("cannot compare rankings of an empty list")
    return depth


def _checked_prefixes(a, b, k):
    depth = effective_depth(k, len(a), len(b))
    a, b = list(a[:depth]), list(b[:depth])
    for ranking in (a, b):
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"ranked list repeats an id: {ranking}")
    return a, b, depth


def average_overlap(a, b, k):
    """AO@k of two ranked id lists (1.0: same top-k in the same order, 0.0: disjoint top-k)."""
    a, b, depth = _checked_prefixes(a, b, k)
    # Literal Eq. (1): this is the reference the score-matrix version is tested against.
    return sum(len(set(a[:d]) & set(b[:d])) / d for d in range(1, depth + 1)) / depth


def jaccard_at_k(a, b, k):
    """JS@k of two ranked id lists: order inside the top-k does not matter."""
    a, b, _ = _checked_prefixes(a, b, k)
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def top_k_ids(scores, k):
    """Ids (column indices) of the ``min(k, num_columns)`` best-scoring columns per row, best first."""
    depth = effective_depth(k, scores.shape[-1])
    return torch.topk(scores, depth, dim=-1).indices


def _prefix_overlaps(ids_a, ids_b):
    """``[queries, depth]`` tensor whose column ``d`` holds |A[:d+1] ∩ B[:d+1]| for every query.

    ``same[q, i, j]`` says A's i-th id equals B's j-th id; with distinct ids per row, the overlap at
    depth d is the count of matches in the leading d x d block, i.e. a 2-D prefix sum read on the
    diagonal. Memory is queries * depth^2, small for the k of retrieval metrics (10).
    """
    same = ids_a.unsqueeze(2) == ids_b.unsqueeze(1)
    prefix = same.int().cumsum(1).cumsum(2)
    return prefix.diagonal(dim1=1, dim2=2)


def average_overlap_from_scores(scores_a, scores_b, k):
    """AO@k per query from two ``[queries, images]`` score matrices (rows: query, its paraphrase)."""
    ids_a, ids_b = top_k_ids(scores_a, k), top_k_ids(scores_b, k)
    overlaps = _prefix_overlaps(ids_a, ids_b).float()
    depths = torch.arange(1, ids_a.shape[1] + 1, device=overlaps.device)
    return (overlaps / depths).mean(dim=1)


def jaccard_at_k_from_scores(scores_a, scores_b, k):
    """JS@k per query from two ``[queries, images]`` score matrices."""
    ids_a, ids_b = top_k_ids(scores_a, k), top_k_ids(scores_b, k)
    intersection = _prefix_overlaps(ids_a, ids_b)[:, -1].float()
    depth = ids_a.shape[1]
    return intersection / (2 * depth - intersection)


def recall_at_k(scores, gold, k):
    """Per-query 1.0/0.0: is the ``gold[q]`` column among row q's top ``min(k, num_images)``?"""
    ids = top_k_ids(scores, k)
    return (ids == gold.unsqueeze(1)).any(dim=1).float()
