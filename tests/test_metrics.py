"""AO@k / JS@k (paper, Appendix B) against hand-computed values, and the score-matrix path against the per-list one."""

import pytest
import torch

from paraclip_plugin.eval.metrics import (
    average_overlap,
    average_overlap_from_scores,
    jaccard_at_k,
    jaccard_at_k_from_scores,
    recall_at_k,
    top_k_ids,
)


def test_identical_lists_score_one_and_disjoint_lists_zero():
    ranking = [7, 3, 9, 1, 4]
    assert average_overlap(ranking, list(ranking), 5) == 1.0
    assert jaccard_at_k(ranking, list(ranking), 5) == 1.0
    assert average_overlap(ranking, [10, 11, 12, 13, 14], 5) == 0.0
    assert jaccard_at_k(ranking, [10, 11, 12, 13, 14], 5) == 0.0


def test_partial_overlap_by_hand():
    a, b = [1, 2, 3, 4], [2, 1, 5, 3]
    # |A[:d] ∩ B[:d]| for d = 1..4:  {1}∩{2}=0,  {1,2}∩{2,1}=2,  {1,2,3}∩{2,1,5}=2,  {1,2,3,4}∩{2,1,5,3}=3
    # AO@4 = (0/1 + 2/2 + 2/3 + 3/4) / 4 = (29/12) / 4 = 29/48
    assert average_overlap(a, b, 4) == pytest.approx(29 / 48)
    # JS@4 = |{1,2,3}| / |{1,2,3,4,5}| = 3/5
    assert jaccard_at_k(a, b, 4) == pytest.approx(3 / 5)
    # At k=2 the top-2 sets are equal (JS = 1) but the order differs, which only AO sees: (0/1 + 2/2) / 2
    assert jaccard_at_k(a, b, 2) == 1.0
    assert average_overlap(a, b, 2) == pytest.approx(1 / 2)


def test_k_beyond_the_lists_uses_the_available_prefix():
    # depth = min(10, 3, 3) = 3:  d=1 {1}∩{3}=0,  d=2 {1,2}∩{3,2}=1 -> 1/2,  d=3 all 3 -> 3/3;  AO = (0 + 1/2 + 1) / 3
    assert average_overlap([1, 2, 3], [3, 2, 1], 10) == pytest.approx(0.5)
    assert jaccard_at_k([1, 2, 3], [3, 2, 1], 10) == 1.0
    # Lists of different lengths compare on the shorter one's length: here the identical first two ids.
    assert average_overlap([1, 2, 3, 4, 5], [1, 2], 10) == 1.0
    assert jaccard_at_k([1, 2, 3, 4, 5], [1, 2], 10) == 1.0


@pytest.mark.parametrize("metric", [average_overlap, jaccard_at_k])
def test_invalid_inputs_are_rejected(metric):
    with pytest.raises(ValueError):
        metric([1, 2], [1, 2], 0)
    with pytest.raises(ValueError):
        metric([], [1, 2], 3)
    with pytest.raises(ValueError):
        metric([1, 1, 2], [1, 2, 3], 3)


def _per_query(metric, scores_a, scores_b, k):
    rankings_a = scores_a.argsort(dim=1, descending=True).tolist()
    rankings_b = scores_b.argsort(dim=1, descending=True).tolist()
    return torch.tensor([metric(a, b, k) for a, b in zip(rankings_a, rankings_b)])


@pytest.mark.parametrize("num_images,k", [(50, 10), (50, 1), (7, 10)])
def test_score_matrix_path_equals_per_list_path_on_random_data(num_images, k):
    generator = torch.Generator().manual_seed(num_images * 100 + k)
    scores_a = torch.randn(200, num_images, generator=generator)
    # Correlated paraphrase scores, so overlaps spread over (0, 1) instead of sitting near chance.
    scores_b = scores_a + 0.7 * torch.randn(200, num_images, generator=generator)
    ao = average_overlap_from_scores(scores_a, scores_b, k)
    js = jaccard_at_k_from_scores(scores_a, scores_b, k)
    assert ao.shape == js.shape == (200,)
    torch.testing.assert_close(ao, _per_query(average_overlap, scores_a, scores_b, k))
    torch.testing.assert_close(js, _per_query(jaccard_at_k, scores_a, scores_b, k))
    if k > 1 and num_images > k:
        assert ao.std() > 0 and 0 < js.mean() < 1  # the random case is not degenerate


def test_score_matrix_path_extremes():
    scores = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(average_overlap_from_scores(scores, scores.clone(), 10), torch.ones(5))
    # Reversed scores put the bottom 10 first: the two top-10 sets are disjoint.
    assert torch.equal(jaccard_at_k_from_scores(scores, -scores, 10), torch.zeros(5))
    assert torch.equal(average_overlap_from_scores(scores, -scores, 10), torch.zeros(5))


def test_recall_at_k_and_top_k_ids():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    assert top_k_ids(scores, 2).tolist() == [[0, 2], [1, 0]]
    gold = torch.tensor([2, 2])
    # Query 0 ranks its gold image 2nd, query 1 ranks it last (3rd).
    assert recall_at_k(scores, gold, 1).tolist() == [0.0, 0.0]
    assert recall_at_k(scores, gold, 2).tolist() == [1.0, 0.0]
    assert recall_at_k(scores, gold, 10).tolist() == [1.0, 1.0]
