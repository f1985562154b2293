"""Tests of clipdecomp.segmentation_metrics against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdecomp.errors import InputError
from clipdecomp.segmentation_metrics import SegmentationMeter, binarize, image_scores, upsample_to

# Image A (2x3).
#   heatmap [[-1, 0, 2], [4, 1, 3]] -> clip -> [[0, 0, 2], [4, 1, 3]] -> /4 ->
#   norm [[0, 0, .5], [1, .25, .75]], mean 2.5/6 = .4167 -> fg [[F, F, T], [T, F, T]]
#   mask [[0, 0, 1], [1, 1, 0]]
#   correct: (0,0) (0,1) (0,2) (1,0) -> 4 of 6
#   background: ~fg = {00, 01, 11}, ~mask = {00, 01, 12}: inter 2, union 4
#   foreground:  fg = {02, 10, 12},  mask = {02, 10, 11}: inter 2, union 4
#   AP over 12 (score, label) pairs, 6 positives:
#     bg channel (1 - norm, ~mask): (1,1) (1,1) (.5,0) (0,0) (.75,0) (.25,1)
#     fg channel (norm, mask):      (0,0) (0,0) (.5,1) (1,1) (.25,1) (.75,0)
#     threshold 1:   tp 3 fp 0 -> P 1,   R 3/6
#     threshold .75: tp 3 fp 2 -> P 3/5, R 3/6
#     threshold .5:  tp 4 fp 3 -> P 4/7, R 4/6
#     threshold .25: tp 6 fp 3 -> P 6/9, R 1
#     threshold 0:   tp 6 fp 6 -> P 1/2, R 1
#     AP = 1/2 * 1 + 1/6 * 4/7 + 1/3 * 6/9 = 1/2 + 2/21 + 2/9 = 103/126
HEAT_A = np.array([[-1.0, 0.0, 2.0], [4.0, 1.0, 3.0]])
MASK_A = np.array([[0, 0, 1], [1, 1, 0]], dtype=np.uint8)
AP_A = 103 / 126

# Image B (3x3).
#   heatmap: 9 at the centre, 0 elsewhere -> norm: 1 at the centre; mean 1/9 -> fg = centre
#   mask: centre and (1, 2)
#   correct: all but (1, 2) -> 8 of 9
#   background: ~fg 8 px, ~mask 7 px: inter 7, union 8;  foreground: inter 1, union 2
#   AP over 18 pairs, 9 positives (7 bg + 2 fg):
#     score 1: 8 bg-channel pixels (7 positive) + fg centre (positive) -> tp 8 fp 1: P 8/9, R 8/9
#     score 0: the rest -> tp 9 fp 9: P 1/2, R 1
#     AP = 8/9 * 8/9 + 1/9 * 1/2 = 137/162
HEAT_B = np.zeros((3, 3))
HEAT_B[1, 1] = 9.0
MASK_B = np.zeros((3, 3), dtype=np.uint8)
MASK_B[1, 1] = MASK_B[1, 2] = 1
AP_B = 137 / 162


def test_binarize_hand_case() -> None:
    norm, fg = binarize(HEAT_A)
    np.testing.assert_allclose(norm, [[0, 0, 0.5], [1, 0.25, 0.75]])
    np.testing.assert_array_equal(fg, [[False, False, True], [True, False, True]])
    assert fg.dtype == bool and norm.dtype == np.float64


def test_binarize_torch_and_leading_axis() -> None:
    norm, fg = binarize(torch.tensor(HEAT_A, dtype=torch.float16)[None])
    np.testing.assert_allclose(norm, [[0, 0, 0.5], [1, 0.25, 0.75]])
    assert fg.sum() == 3


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_binarize_constant_map_is_all_background(value: float) -> None:
    norm, fg = binarize(np.full((2, 3), value))
    np.testing.assert_array_equal(norm, np.zeros((2, 3)))
    assert not fg.any()


def test_binarize_all_negative_is_constant_after_clipping() -> None:
    norm, fg = binarize(np.array([[-3.0, -1.0], [-2.0, -0.5]]))
    assert not norm.any() and not fg.any()


def test_binarize_clips_negatives_before_normalising() -> None:
    # [-5, 0, 10] -> [0, 0, 10] -> [0, 0, 1] (without clipping it would be [0, 1/3, 1]); mean 1/3
    norm, fg = binarize(np.array([[-5.0, 0.0, 10.0]]))
    np.testing.assert_allclose(norm, [[0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(fg, [[False, False, True]])


def test_binarize_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="NaN"):
        binarize(np.array([[0.0, np.nan]]))
    with pytest.raises(InputError, match="2-D"):
        binarize(np.zeros(4))
    with pytest.raises(InputError, match="empty"):
        binarize(np.zeros((0, 3)))


def test_image_scores_hand_case_a() -> None:
    s = image_scores(HEAT_A, MASK_A)
    assert (s["correct"], s["labeled"]) == (4, 6)
    np.testing.assert_array_equal(s["intersection"], [2, 2])
    np.testing.assert_array_equal(s["union"], [4, 4])
    assert s["ap"] == pytest.approx(AP_A)


def test_image_scores_hand_case_b() -> None:
    s = image_scores(HEAT_B, MASK_B.astype(bool))
    assert (s["correct"], s["labeled"]) == (8, 9)
    np.testing.assert_array_equal(s["intersection"], [7, 1])
    np.testing.assert_array_equal(s["union"], [8, 2])
    assert s["ap"] == pytest.approx(AP_B)


def test_meter_accumulates_sums_then_ratio() -> None:
    meter = SegmentationMeter()
    meter.update(HEAT_A, MASK_A)
    meter.update(torch.tensor(HEAT_B), torch.tensor(MASK_B))
    out = meter.compute()
    # pixel accuracy (4 + 8) / (6 + 9); IoU bg (2 + 7) / (4 + 8) = .75, fg (2 + 1) / (4 + 2) = .5
    # (the mean of per-image mIoUs would be (.5 + (7/8 + 1/2) / 2) / 2 = .59375 instead)
    assert out["pixel_accuracy"] == pytest.approx(12 / 15)
    assert out["iou_background"] == pytest.approx(0.75)
    assert out["iou_foreground"] == pytest.approx(0.5)
    assert out["miou"] == pytest.approx(0.625)
    assert out["map"] == pytest.approx((AP_A + AP_B) / 2)
    assert out["n_images"] == 2 and len(meter) == 2
    meter.reset()
    with pytest.raises(InputError, match="before any update"):
        meter.compute()


def test_meter_perfect_prediction() -> None:
    mask = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=np.uint8)
    meter = SegmentationMeter()
    meter.update(mask.astype(float) * 5 - 1, mask)  # negatives clip to 0, object = 4
    out = meter.compute()
    assert out["pixel_accuracy"] == pytest.approx(1.0)
    assert out["miou"] == pytest.approx(1.0)
    assert out["map"] == pytest.approx(1.0)


def test_meter_constant_map_predicts_background() -> None:
    # 2x2, one object pixel; constant map -> all background: 3 of 4 correct;
    # IoU bg 3/4, fg 0/1 -> mIoU 3/8.  AP: score 1 for the 4 bg-channel entries (3 positive)
    # -> P 3/4 R 3/4; score 0 for the rest -> P 1/2 R 1: AP = 9/16 + 1/8 = 11/16
    meter = SegmentationMeter()
    meter.update(np.ones((2, 2)), np.array([[1, 0], [0, 0]]))
    out = meter.compute()
    assert out["pixel_accuracy"] == pytest.approx(0.75)
    assert out["miou"] == pytest.approx(3 / 8)
    assert out["map"] == pytest.approx(11 / 16)


def test_meter_rejects_bad_masks() -> None:
    meter = SegmentationMeter()
    with pytest.raises(InputError, match="upsample_to"):
        meter.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(InputError, match="accepted are 0"):
        meter.update(np.zeros((2, 2)), np.array([[0, 255], [0, 1]]))
    assert len(meter) == 0


def test_upsample_to_hand_values() -> None:
    # align_corners=False: output column centres map to source x = -0.25, .25, .75, 1.25
    # (clamped to [0, 1]) -> values 0, .25, .75, 1
    out = upsample_to(np.array([[0.0, 1.0], [0.0, 1.0]]), (2, 4))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_allclose(out, [[0, 0.25, 0.75, 1]] * 2)


def test_upsample_to_torch_keeps_type() -> None:
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    out = upsample_to(t, (4, 6))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (4, 6)
    const = upsample_to(torch.full((2, 2), 3, dtype=torch.int64), (5, 7))
    assert const.dtype == torch.float32
    assert torch.allclose(const, torch.full((5, 7), 3.0))
    with pytest.raises(InputError):
        upsample_to(t, (4,))
    with pytest.raises(InputError):
        upsample_to(torch.zeros(2, 2, 2), (4, 4))
