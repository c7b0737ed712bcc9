"""Heatmap -> boxes, IoU / IoBB / pointing arithmetic, localization_scores and overlays, on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr.localization import (
    average_false_positives,
    heatmap_to_boxes,
    iobb,
    iou,
    localization_scores,
    pointing_hit,
)
from cxr.overlays import GT_COLOUR, MIN_SIDE, PRED_COLOUR, overlay, panel


def test_iou_on_hand_made_boxes():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 5, 10, 10)) == pytest.approx(25 / 175)
    assert iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0.0  # touching edges share no area
    assert iou((0, 0, 10, 10), (30, 30, 5, 5)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert iou({"x": 0, "y": 0, "w": 4, "h": 4, "score": 0.3}, (2, 0, 4, 4)) == pytest.approx(8 / 24)


def test_iobb_divides_by_the_predicted_box():
    assert iobb(pred_box=(5, 5, 10, 10), gt_box=(0, 0, 10, 10)) == pytest.approx(0.25)
    assert iobb(pred_box=(2, 2, 3, 3), gt_box=(0, 0, 10, 10)) == 1.0  # inside the ground truth
    assert iobb(pred_box=(0, 0, 20, 20), gt_box=(0, 0, 10, 10)) == pytest.approx(0.25)  # not symmetric
    assert iobb(pred_box=(0, 0, 0, 5), gt_box=(0, 0, 10, 10)) == 0.0


def test_pointing_hit_uses_the_argmax_pixel_centre():
    heatmap = np.zeros((10, 10), np.float32)
    heatmap[2, 7] = 1.0
    heatmap[8, 1] = 0.9
    assert pointing_hit(heatmap, (7, 2, 1, 1))
    assert pointing_hit(heatmap, (6, 0, 2, 3))
    assert not pointing_hit(heatmap, (0, 0, 7, 10))  # the peak's centre 7.5 lies right of x + w = 7
    assert not pointing_hit(heatmap, (0, 5, 10, 5))  # the second-best blob does not count
    assert not pointing_hit(np.zeros((4, 4)), (0, 0, 4, 4))
    with pytest.raises(ValueError, match="2-D heatmap"):
        pointing_hit(np.zeros((1, 4, 4)), (0, 0, 4, 4))


def test_two_blobs_give_two_scaled_boxes_best_first():
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[40:50, 30:45] = 0.8  # rows 40..49, columns 30..44
    heatmap[10:20, 5:15] = 0.6
    heatmap[12, 7] = 1.0  # the peak sits inside the first blob
    heatmap[60, 60] = 0.9  # one pixel: below 0.001 of the map's area
    boxes = heatmap_to_boxes(heatmap, threshold=0.5, scale=(1024 / 64, 1024 / 64))
    assert boxes == [
        {"x": 80.0, "y": 160.0, "w": 160.0, "h": 160.0, "score": 1.0},
        {"x": 480.0, "y": 640.0, "w": 240.0, "h": 160.0, "score": pytest.approx(0.8)},
    ]
    kept = heatmap_to_boxes(heatmap, min_area_fraction=0.0)
    assert [box["score"] for box in kept] == pytest.approx([1.0, 0.9, 0.8])
    assert kept[1] == {"x": 60.0, "y": 60.0, "w": 1.0, "h": 1.0, "score": pytest.approx(0.9)}
    high = heatmap_to_boxes(heatmap, threshold=0.7)  # the 0.6 blob drops out, leaving its peak pixel: too small
    assert [box["score"] for box in high] == pytest.approx([0.8]) and high[0]["x"] == 30.0
    assert heatmap_to_boxes(heatmap, scale=2.0)[0]["w"] == 20.0


def test_heatmap_to_boxes_edge_cases():
    assert heatmap_to_boxes(np.zeros((16, 16))) == []
    diagonal = np.eye(8, dtype=np.float32)  # 8-connected: one diagonal region, one box
    assert heatmap_to_boxes(diagonal) == [{"x": 0.0, "y": 0.0, "w": 8.0, "h": 8.0, "score": 1.0}]
    with pytest.raises(ValueError, match="fraction of the map's max"):
        heatmap_to_boxes(diagonal, threshold=1.5)
    with pytest.raises(ValueError, match="2-D heatmap"):
        heatmap_to_boxes(np.zeros((2, 8, 8)))


def peaked_heatmap(size: int, row: int, col: int) -> np.ndarray:
    heatmap = np.zeros((size, size), np.float32)
    heatmap[row, col] = 1.0
    return heatmap


def test_localization_scores_on_a_hand_made_record_set():
    records = [
        {"finding": "Atelectasis", "gt_box": (0, 0, 10, 10), "pred_boxes": [(0, 0, 10, 10)],
         "heatmap": peaked_heatmap(20, 2, 3)},  # IoBB 1, IoU 1, pointing hit
        {"finding": "Atelectasis", "gt_box": (0, 0, 10, 10), "pred_boxes": [(5, 0, 10, 10)]},  # IoBB .5, IoU 1/3
        {"finding": "Mass", "gt_box": (0, 0, 10, 10), "pred_boxes": [],
         "heatmap": peaked_heatmap(8, 6, 6), "scale": 2.0},  # nothing predicted; peak at (13, 13) in box space
        {"finding": "Mass", "gt_box": (0, 0, 4, 4),  # best IoBB 1.0 (second box), best IoU 0.25
         "pred_boxes": [{"x": 0, "y": 0, "w": 20, "h": 20, "score": 0.9}, (1, 1, 2, 2)]},
        {"finding": "Infiltrate", "gt_box": (100, 100, 50, 50),  # IoBB 0.25 and IoU 0.25: not > 0.25
         "pred_boxes": [{"x": 100, "y": 100, "w": 100, "h": 100, "score": 0.7}],
         "heatmap": peaked_heatmap(32, 14, 15), "scale": (8.0, 8.0)},
        {"finding": "Hernia", "gt_box": (0, 0, 10, 10), "pred_boxes": [(20, 20, 5, 5)]},
    ]
    scores = localization_scores(records)
    assert scores["thresholds"] == {"iobb": [0.1, 0.25, 0.5, 0.75, 0.9], "iou": [0.1, 0.3, 0.5]}
    assert list(scores["per_class"]) == ["Atelectasis", "Infiltration", "Mass", "Hernia"]
    atelectasis, mass = scores["per_class"]["Atelectasis"], scores["per_class"]["Mass"]
    assert atelectasis == {"boxes": 2, "iobb": {"0.1": 1.0, "0.25": 1.0, "0.5": 0.5, "0.75": 0.5, "0.9": 0.5},
                           "iou": {"0.1": 1.0, "0.3": 1.0, "0.5": 0.5}, "pointing": 1.0, "pointing_boxes": 1, "pointing_hits": 1}
    assert mass == {"boxes": 2, "iobb": {"0.1": 0.5, "0.25": 0.5, "0.5": 0.5, "0.75": 0.5, "0.9": 0.5},
                    "iou": {"0.1": 0.5, "0.3": 0.0, "0.5": 0.0}, "pointing": 0.0, "pointing_boxes": 1, "pointing_hits": 0}
    infiltration = scores["per_class"]["Infiltration"]
    assert infiltration["iobb"]["0.1"] == 1.0 and infiltration["iobb"]["0.25"] == 0.0
    assert infiltration["iou"] == {"0.1": 1.0, "0.3": 0.0, "0.5": 0.0} and infiltration["pointing"] == 1.0
    hernia = scores["per_class"]["Hernia"]
    assert hernia["pointing"] is None and hernia["iobb"]["0.1"] == 0.0
    overall = scores["overall"]
    assert overall["boxes"] == 6 and overall["pointing_boxes"] == 3
    assert overall["iobb"] == pytest.approx({"0.1": 4 / 6, "0.25": 3 / 6, "0.5": 2 / 6, "0.75": 2 / 6, "0.9": 2 / 6})
    assert overall["iou"] == pytest.approx({"0.1": 4 / 6, "0.3": 2 / 6, "0.5": 1 / 6})
    assert overall["pointing"] == pytest.approx(2 / 3)
    assert json.loads(json.dumps(scores)) == scores


def test_localization_scores_keeps_unknown_names_and_rejects_bad_input():
    scores = localization_scores([{"finding": "Lung Opacity", "gt_box": (0, 0, 2, 2), "pred_boxes": [(0, 0, 2, 2)]}])
    assert list(scores["per_class"]) == ["Lung Opacity"] and scores["overall"]["iou"]["0.5"] == 1.0
    with pytest.raises(ValueError, match="got no records"):
        localization_scores([])
    with pytest.raises(ValueError, match=r"record 0 \(Mass\) has no 'gt_box'"):
        localization_scores([{"finding": "Mass", "pred_boxes": []}])


def test_overlay_blends_jet_and_draws_both_box_kinds():
    gray = np.full((128, 128), 100, np.uint8)
    heatmap = np.zeros((16, 16), np.float32)
    heatmap[:8, :8] = 1.0  # hot top-left quadrant
    pred = {"x": 70, "y": 70, "w": 40, "h": 30, "score": 0.87}
    image = overlay(gray, heatmap, [pred], gt_boxes=[(20, 80, 30, 30)], min_side=0)  # no enlargement
    assert image.shape == (128, 128 + 64, 3) and image.dtype == np.uint8  # + the colour bar
    assert tuple(image[95, 20]) == GT_COLOUR  # left edge of the ground-truth box
    assert tuple(image[90, 70]) == PRED_COLOUR  # left edge of the predicted box
    assert tuple(image[120, 120]) == (60, 60, 111)  # 0.6 * gray 100 + 0.4 * jet(0) = dark blue (0, 0, 128)
    assert tuple(image[40, 30]) == (111, 60, 60)  # 0.6 * gray 100 + 0.4 * jet(1) = dark red (128, 0, 0)
    assert tuple(image[0, 128 + 10]) == (128, 0, 0) and tuple(image[127, 128 + 10]) == (0, 0, 128)  # bar: 1 top, 0 bottom
    assert np.all(gray == 100)  # the input is not drawn on
    titled = overlay(gray, heatmap, [pred], gt_boxes=[(20, 80, 30, 30)], title="Mass 0.87", min_side=0)
    band = titled.shape[0] - 128
    assert band > 10 and np.array_equal(titled[band:], image)  # the title has its own band above the image
    assert (titled[:band] == 255).all(axis=-1).any()
    with pytest.raises(ValueError, match="2-D uint8 grayscale"):
        overlay(np.zeros((8, 8, 3), np.uint8), heatmap, [])


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (40, 700)])
def test_overlay_size_rule_and_long_titles_fit(shape):
    gray = np.full(shape, 80, np.uint8)
    title = "a_rather_long_image_name_00012345_001.png  Pleural_Thickening p=0.123  (layercam@features.denseblock2)"
    picture = overlay(gray, np.ones((4, 4)), [{"x": 2, "y": 2, "w": 10, "h": 30, "score": 0.5}], title=title, label="Mass")
    factor = max(1.0, MIN_SIDE / max(shape))
    image_h, image_w = round(shape[0] * factor), round(shape[1] * factor)
    assert max(image_h, image_w) >= MIN_SIDE and picture.shape[1] == image_w + 64
    band = picture[: picture.shape[0] - image_h]
    text_columns = np.nonzero((band == 255).all(axis=-1).any(axis=0))[0]
    assert text_columns.size and text_columns.max() < picture.shape[1] - 2  # every title line ends inside the picture
    assert (band == 255).all(axis=-1).any(axis=1).sum() > 8  # the text is drawn, not dropped
    # A predicted box is drawn at the enlarged scale: its left edge lies at x = 2 * factor.
    assert tuple(picture[picture.shape[0] - image_h + round(25 * factor), round(2 * factor)]) == PRED_COLOUR


def test_panel_puts_pictures_side_by_side():
    first, second = np.zeros((10, 6, 3), np.uint8), np.full((7, 5, 3), 9, np.uint8)
    row = panel([first, second], gap=2)
    assert row.shape == (10, 6 + 2 + 5, 3) and (row[:7, 8:] == 9).all() and (row[7:, 8:] == 255).all()


def test_average_false_positives_on_hand_made_boxes():
    groups = [
        # image a, Mass: one box on the lesion (IoBB 1), one half on it (IoBB 0.5), one far away (IoBB 0)
        {"image": "a", "finding": "Mass", "gt_boxes": [(0, 0, 10, 10)],
         "pred_boxes": [(2, 2, 4, 4), (5, 0, 10, 10), {"x": 50, "y": 50, "w": 5, "h": 5, "score": 1.0}]},
        {"image": "a", "finding": "Nodule", "gt_boxes": [(20, 20, 4, 4)], "pred_boxes": []},
        {"image": "b", "finding": "Mass", "gt_boxes": [(0, 0, 10, 10), (30, 30, 10, 10)], "pred_boxes": [(30, 30, 5, 5)]},
    ]
    afp = average_false_positives(groups)
    # Mass, 2 images: at T=0.1 only the far box misses (1/2); at 0.5 the half box misses too (IoBB 0.5 is not > 0.5).
    assert afp["per_class"]["Mass"] == {"0.1": 0.5, "0.25": 0.5, "0.5": 1.0, "0.75": 1.0, "0.9": 1.0}
    assert afp["per_class"]["Nodule"] == dict.fromkeys(("0.1", "0.25", "0.5", "0.75", "0.9"), 0.0)
    assert afp["overall"]["0.5"] == 2 / 2 and afp["overall"]["0.1"] == 1 / 2  # over the 2 distinct images
    assert list(afp["per_class"]) == ["Mass", "Nodule"]


def test_pointing_uses_the_centre_of_a_flat_maximum():
    import torch
    import torch.nn.functional as F

    from cxr.localization import pointing_location

    # A 2x2 map whose top-right cell is hottest, upsampled as Grad-CAM does: the maximum is a flat 16x16 plateau
    # in the image corner, and its first pixel (0, 48) would point at the border.
    coarse = torch.tensor([[[[0.2, 1.0], [0.1, 0.3]]]])
    heatmap = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert pointing_location(heatmap) == (56.0, 8.0)
    assert pointing_hit(heatmap, (40, 0, 24, 24)) and not pointing_hit(heatmap, (48, 0, 6, 6))
    assert pointing_location(np.zeros((8, 8))) is None
