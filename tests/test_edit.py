"""Geometry edit T (paper sec. 3, "Editing"): exact placement of masks under shift, scale and rotation."""

import pytest
import torch
from harmonizing_attention.attention.edit import Placement, binarize, mask_anchor, place_source


def rect_mask(h, w, rows, cols, batch=1):
    """Mask [batch,h,w] with 1 on rows rows[0]..rows[1] and cols cols[0]..cols[1] (inclusive)."""
    m = torch.zeros(batch, h, w)
    m[:, rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = 1.0
    return m


def images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)


def bbox(mask2d):
    ys, xs = torch.nonzero(mask2d, as_tuple=True)
    return ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()


def test_binarize_threshold():
    m = torch.tensor([0.0, 0.49, 0.5, 0.7, 1.0])
    assert torch.equal(binarize(m), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))


def test_mask_anchor_is_bbox_centre():
    m = rect_mask(20, 30, (3, 8), (10, 13))[0]
    m[5, 25] = 0.6  # widens the bbox to column 25
    m[0, 0] = 0.4  # below threshold: ignored
    assert mask_anchor(m) == ((10 + 25) / 2, (3 + 8) / 2)


def test_identity_placement_returns_source_in_mask_and_target_outside():
    source, target = images(1, 32, 32, seed=1), images(1, 32, 32, seed=2)
    mask = rect_mask(32, 32, (5, 20), (7, 12))
    mask[0, 21, 9] = 0.8  # irregular, soft-valued shape
    mask[0, 10, 10] = 0.3  # hole after binarization
    geo, geo_mask = place_source(source, mask, target, Placement())
    assert torch.equal(geo_mask, binarize(mask))
    inside = geo_mask[0] > 0
    torch.testing.assert_close(geo[0][inside], source[0][inside], rtol=0, atol=1e-6)
    assert torch.equal(geo[0][~inside], target[0][~inside])


def test_shift_moves_square_exactly():
    source, target = images(1, 40, 40, seed=3), images(1, 40, 40, seed=4)
    mask = rect_mask(40, 40, (12, 19), (8, 15))
    geo, geo_mask = place_source(source, mask, target, Placement(shift_x=10, shift_y=-6))
    assert torch.equal(geo_mask, rect_mask(40, 40, (6, 13), (18, 25)))
    torch.testing.assert_close(geo[0, 6:14, 18:26], source[0, 12:20, 8:16], rtol=0, atol=1e-6)


def test_scale_about_anchor():
    source, target = images(1, 40, 40), images(1, 40, 40, seed=5)
    mask = rect_mask(40, 40, (12, 19), (8, 15))  # 8x8, anchor (11.5, 15.5)
    _, doubled = place_source(source, mask, target, Placement(scale=2.0))
    assert torch.equal(doubled, rect_mask(40, 40, (8, 23), (4, 19)))  # 16x16 about the same anchor
    _, halved = place_source(source, mask, target, Placement(scale=0.5))
    assert torch.equal(halved, rect_mask(40, 40, (14, 17), (10, 13)))


@pytest.mark.parametrize(
    ("rotation", "right_half_rows", "left_half_rows"),
    [(90.0, (8, 11), (12, 15)), (-90.0, (12, 15), (8, 11))],
)
def test_rotation_is_counter_clockwise_on_screen(rotation, right_half_rows, left_half_rows):
    # 8 wide x 4 tall rectangle, anchor (23.5, 11.5); its right half is bright, its left half dark.
    source = torch.zeros(1, 48, 48, 3)
    source[0, 10:14, 20:24] = 0.2
    source[0, 10:14, 24:28] = 0.8
    mask = rect_mask(48, 48, (10, 13), (20, 27))
    target = torch.full((1, 48, 48, 3), 0.5)
    geo, geo_mask = place_source(source, mask, target, Placement(rotation=rotation))
    assert torch.equal(geo_mask, rect_mask(48, 48, (8, 15), (22, 25)))  # now 4 wide x 8 tall
    r0, r1 = right_half_rows
    l0, l1 = left_half_rows
    torch.testing.assert_close(geo[0, r0 : r1 + 1, 22:26], torch.full((4, 4, 3), 0.8), rtol=0, atol=1e-6)
    torch.testing.assert_close(geo[0, l0 : l1 + 1, 22:26], torch.full((4, 4, 3), 0.2), rtol=0, atol=1e-6)


def test_different_canvas_keeps_relative_position_and_pixel_size():
    source = images(1, 32, 32, seed=6)
    target = images(1, 64, 96, seed=7)  # H=64, W=96
    mask = rect_mask(32, 32, (8, 15), (8, 15))  # extent [8, 16) of 32 -> [24, 48) of 96 and [16, 32) of 64
    geo, geo_mask = place_source(source, mask, target, Placement())
    assert geo.shape == (1, 64, 96, 3) and geo_mask.shape == (1, 64, 96)
    assert torch.equal(geo_mask, rect_mask(64, 96, (20, 27), (32, 39)))  # 8x8, centred at (35.5, 23.5)
    torch.testing.assert_close(geo[0, 20:28, 32:40], source[0, 8:16, 8:16], rtol=0, atol=1e-6)


def test_batch_broadcast_single_source_many_targets():
    source, targets = images(1, 24, 24, seed=8), images(3, 24, 24, seed=9)
    mask = rect_mask(24, 24, (4, 9), (6, 11))
    geo, geo_mask = place_source(source, mask, targets, Placement(shift_x=3))
    assert geo.shape == (3, 24, 24, 3) and geo_mask.shape == (3, 24, 24)
    for i in range(3):
        one, one_mask = place_source(source, mask, targets[i : i + 1], Placement(shift_x=3))
        assert torch.equal(geo[i], one[0]) and torch.equal(geo_mask[i], one_mask[0])


def test_batch_broadcast_many_sources_each_with_its_own_anchor():
    sources, target = images(2, 24, 24, seed=10), images(1, 24, 24, seed=11)
    masks = torch.cat([rect_mask(24, 24, (2, 5), (2, 5)), rect_mask(24, 24, (14, 19), (10, 13))])
    _, geo_mask = place_source(sources, masks, target, Placement(shift_x=1, shift_y=2))
    assert torch.equal(geo_mask[0], rect_mask(24, 24, (4, 7), (3, 6))[0])
    assert torch.equal(geo_mask[1], rect_mask(24, 24, (16, 21), (11, 14))[0])


def test_2d_mask_is_accepted():
    source, target = images(1, 16, 16), images(1, 16, 16, seed=1)
    mask = rect_mask(16, 16, (3, 6), (3, 6))
    _, from_3d = place_source(source, mask, target, Placement(shift_x=2))
    _, from_2d = place_source(source, mask[0], target, Placement(shift_x=2))
    assert torch.equal(from_3d, from_2d)


def test_empty_source_mask_raises():
    source = images(1, 16, 16)
    with pytest.raises(ValueError, match=r"source mask is empty .*16x16.*paint the region"):
        place_source(source, torch.full((1, 16, 16), 0.4), source, Placement())


def test_off_canvas_raises_with_anchor_canvas_and_fixing_shift():
    source, target = images(1, 40, 40), images(1, 40, 40, seed=1)
    mask = rect_mask(40, 40, (8, 15), (8, 15))  # anchor (11.5, 11.5)
    with pytest.raises(ValueError) as err:
        place_source(source, mask, target, Placement(shift_x=-100, shift_y=5))
    message = str(err.value)
    assert "(-88.5, 16.5)" in message and "40x40" in message
    assert "shift_x to -11.5 and shift_y to 5" in message
    _, geo_mask = place_source(source, mask, target, Placement(shift_x=-11.5, shift_y=5))
    assert geo_mask.sum() > 0  # the suggested shift does bring it back


def test_mask_image_size_mismatch_raises():
    message = r"source mask is 16x32 \(WxH\) but the source image is 16x16 .*resize"
    with pytest.raises(ValueError, match=message):
        place_source(images(1, 16, 16), torch.ones(1, 32, 16), images(1, 16, 16), Placement())


def test_incompatible_batches_raise():
    with pytest.raises(ValueError, match=r"batch sizes do not match \(source 2, source_mask 2, target 3\)"):
        place_source(images(2, 8, 8), torch.ones(2, 8, 8), images(3, 8, 8), Placement())


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_non_positive_scale_raises(scale):
    source = images(1, 8, 8)
    with pytest.raises(ValueError, match=rf"scale must be > 0, got {scale}"):
        place_source(source, torch.ones(1, 8, 8), source, Placement(scale=scale))
