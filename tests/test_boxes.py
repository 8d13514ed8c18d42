"""Box helpers shared by data code and metrics (visto.utils.boxes)."""

from __future__ import annotations

import pytest

from visto.utils.boxes import box_iou, match_boxes


def test_iou_of_boxes():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0  # degenerate


def test_matching_is_one_to_one_best_pairs_first_above_the_threshold():
    truth = [[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 60]]
    found = [[1, 0, 11, 10], [0, 0, 10, 10], [101, 100, 111, 110], [300, 300, 310, 310]]
    # truth 0 takes found 1 (IoU 1.0) before found 0 (0.82); found 0 is then no one's
    assert match_boxes(truth, found) == {0: 1, 1: 2}
    assert match_boxes(truth, found, threshold=0.95) == {0: 1}
    assert match_boxes([], found) == {} and match_boxes(truth, []) == {}
