"""Colour adjustment: eq. 1's colour shift and the histogram-matching ablation (paper sec. 3 and 4.6.1)."""

import numpy as np
import pytest
import torch
from harmonizing_attention.attention.color import histogram_match, mean_shift, regional_shift, ring, ring_mean


def rect_mask(h, w, rows, cols, batch=1):
    m = torch.zeros(batch, h, w)
    m[:, rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = 1.0
    return m


def naive_ring(mask2d, width):
    """Pixels outside the mask within Chebyshev distance `width` of a mask pixel, by explicit loops."""
    h, w = mask2d.shape
    inside = mask2d >= 0.5
    out = torch.zeros(h, w, dtype=torch.bool)
    for y in range(h):
        for x in range(w):
            if inside[y, x]:
                continue
            near = inside[max(y - width, 0) : y + width + 1, max(x - width, 0) : x + width + 1]
            out[y, x] = bool(near.any())
    return out


def rand_images(b, h, w, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(b, h, w, 3, generator=g)


def test_ring_of_known_square():
    mask = rect_mask(12, 12, (4, 6), (4, 6))
    mask[0, 5, 5] = 0.7  # soft values are binarized
    expected = rect_mask(12, 12, (2, 8), (2, 8)) - rect_mask(12, 12, (4, 6), (4, 6))
    assert torch.equal(ring(mask, 2), expected)


def test_ring_clips_at_the_border_and_matches_naive_ring():
    mask = rect_mask(10, 10, (0, 2), (0, 2))
    assert torch.equal(ring(mask, 1), rect_mask(10, 10, (0, 3), (0, 3)) - mask)
    blob = rect_mask(16, 16, (3, 9), (5, 7))
    blob[0, 12, 12] = 1.0
    assert torch.equal(ring(blob, 3)[0] > 0, naive_ring(blob[0], 3))


def test_ring_mean_is_mean_on_ring():
    image = rand_images(1, 12, 12, 0.0, 1.0, seed=0)
    mask = rect_mask(12, 12, (3, 5), (6, 9))
    expected = image[0][naive_ring(mask[0], 2)].mean(dim=0)
    torch.testing.assert_close(ring_mean(image, mask, 2)[0], expected, rtol=0, atol=1e-6)


def test_mean_shift_equals_eq1():
    source = rand_images(1, 16, 16, 0.3, 0.7, seed=1)
    source_mask = rect_mask(16, 16, (4, 9), (5, 10))
    target = rand_images(1, 20, 24, 0.3, 0.7, seed=2)
    geometry = rand_images(1, 20, 24, 0.3, 0.7, seed=3)
    geometry_mask = rect_mask(20, 24, (8, 13), (3, 8))
    a, width = 0.5, 2
    out = mean_shift(geometry, geometry_mask, source, source_mask, target, a, width)

    c_src = source[0][naive_ring(source_mask[0], width)].mean(dim=0)
    c_tar = target[0][naive_ring(geometry_mask[0], width)].mean(dim=0)
    expected = geometry[0].clone()
    for y in range(20):
        for x in range(24):
            if geometry_mask[0, y, x] == 1:
                expected[y, x] = geometry[0, y, x] + a * (c_tar - c_src)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)
    outside = geometry_mask[0] == 0
    assert torch.equal(out[0][outside], geometry[0][outside])


def test_mean_shift_zero_strength_is_identity():
    geometry = rand_images(1, 8, 8, 0.0, 1.0, seed=4)
    full = torch.ones(1, 8, 8)  # no ring at all: a = 0 must not even need one
    out = mean_shift(geometry, full, geometry, full, geometry, 0.0, 4)
    assert torch.equal(out, geometry)


def test_mean_shift_clamps_only_the_final_image():
    source = torch.full((1, 12, 12, 3), 0.1)
    source_mask = rect_mask(12, 12, (4, 7), (4, 7))
    target = torch.full((1, 12, 12, 3), 0.9)
    geometry = torch.full((1, 12, 12, 3), 0.5)
    geometry[0, 4, 4] = 0.95  # 0.95 + 0.8 -> 1.75, clamped to 1
    geometry[0, 5, 5] = 0.05  # 0.05 + 0.8 = 0.85, unclamped
    out = mean_shift(geometry, source_mask, source, source_mask, target, 1.0, 1)
    assert torch.equal(out[0, 4, 4], torch.ones(3))
    torch.testing.assert_close(out[0, 5, 5], torch.full((3,), 0.85), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 6, 6], torch.full((3,), 1.0), rtol=0, atol=1e-6)  # 0.5 + 0.8 -> 1
    assert torch.equal(out[0, 0, 0], geometry[0, 0, 0])


def test_mean_shift_broadcasts_single_source_over_batch():
    source = rand_images(1, 12, 12, 0.3, 0.7, seed=5)
    source_mask = rect_mask(12, 12, (3, 6), (3, 6))
    target = rand_images(2, 12, 12, 0.3, 0.7, seed=6)
    geometry = rand_images(2, 12, 12, 0.3, 0.7, seed=7)
    geometry_mask = rect_mask(12, 12, (5, 8), (2, 5))
    out = mean_shift(geometry, geometry_mask, source, source_mask, target, 0.7, 2)
    assert out.shape == (2, 12, 12, 3)
    for i in range(2):
        one = mean_shift(geometry[i : i + 1], geometry_mask, source, source_mask, target[i : i + 1], 0.7, 2)
        assert torch.equal(out[i], one[0])


def test_histogram_match_takes_exactly_the_reference_values():
    # A 4x6 region has a width-1 ring of (4+2)(6+2) - 24 = 24 pixels: as many as the region.
    h, w = 10, 12
    mask = rect_mask(h, w, (3, 6), (3, 8))
    ring_px = naive_ring(mask[0], 1)
    inside = mask[0] > 0
    g = torch.Generator().manual_seed(8)
    levels = torch.linspace(0.1, 0.9, 24)
    reference = torch.stack([levels[torch.randperm(24, generator=g)] for _ in range(3)], dim=1)  # [24, C]
    target = torch.zeros(1, h, w, 3)
    target[0][ring_px] = reference
    target[0][inside] = 1.0  # under the mask: must not be used
    geometry = rand_images(1, h, w, 0.0, 1.0, seed=9)
    out = histogram_match(geometry, mask, target, 1)
    matched = out[0][inside]
    assert torch.equal(matched.sort(dim=0).values, reference.sort(dim=0).values)
    assert torch.equal(matched.argsort(dim=0), geometry[0][inside].argsort(dim=0))  # order preserved
    assert torch.equal(out[0][~inside], geometry[0][~inside])


def test_histogram_match_equals_cdf_definition_with_ties():
    h, w = 16, 16
    mask = rect_mask(h, w, (4, 10), (3, 9))  # 49 pixels, ring of width 2: 72 pixels
    inside, ring_px = mask[0] > 0, naive_ring(mask[0], 2)
    geometry = (rand_images(1, h, w, 0.0, 1.0, seed=10) * 8).round() / 8  # few levels: many ties
    target = rand_images(1, h, w, 0.2, 0.6, seed=11)
    out = histogram_match(geometry, mask, target, 2)
    for c in range(3):
        values = geometry[0][inside][:, c].double().numpy()
        reference = np.sort(target[0][ring_px][:, c].double().numpy())
        cdf = np.array([(values <= v).sum() / values.size for v in values])
        quantiles = np.arange(1, reference.size + 1) / reference.size
        expected = np.interp(cdf, quantiles, reference)
        np.testing.assert_allclose(out[0][inside][:, c].numpy(), expected, rtol=0, atol=1e-6)
    assert torch.equal(out[0][~inside], geometry[0][~inside])


def test_full_mask_has_no_ring():
    image = rand_images(1, 12, 10, 0.0, 1.0, seed=12)
    full = torch.ones(1, 12, 10)
    with pytest.raises(ValueError, match=r"geometry mask covers the whole 10x12 \(WxH\) image"):
        mean_shift(image, full, image, rect_mask(12, 10, (2, 4), (2, 4)), image, 0.5, 2)
    with pytest.raises(ValueError, match=r"mask covers the whole 10x12 \(WxH\) image"):
        ring_mean(image, full, 2)
    with pytest.raises(ValueError, match=r"geometry mask covers the whole 10x12"):
        histogram_match(image, full, image, 2)


@pytest.mark.parametrize("a", [-0.1, 1.5])
def test_strength_out_of_range(a):
    image = rand_images(1, 8, 8, 0.0, 1.0, seed=13)
    mask = rect_mask(8, 8, (2, 4), (2, 4))
    with pytest.raises(ValueError, match=rf"strength a must be in \[0, 1\], got {a}"):
        mean_shift(image, mask, image, mask, image, a, 2)


def test_ring_width_must_be_positive():
    with pytest.raises(ValueError, match=r"ring width must be a whole number of pixels >= 1, got 0"):
        ring(torch.ones(1, 4, 4), 0)


# ---------------------------------------------------------------- regional colour shift (c_tar varying with position)


def gradient_scene(h=48, w=96, seed=14):
    """A target with a left-to-right colour gradient (red up, blue down), a textured patch in a wide box mask."""
    x = torch.linspace(0, 1, w)
    target = torch.stack([0.2 + 0.6 * x, torch.full_like(x, 0.5), 0.8 - 0.6 * x], -1).expand(1, h, w, 3).clone()
    mask = rect_mask(h, w, (14, 33), (16, 79))
    source = rand_images(1, h, w, 0.25, 0.35, seed=seed)
    geometry = target.clone()
    geometry[0][mask[0] > 0] = source[0][mask[0] > 0]
    return geometry, mask, source, target


def test_regional_shift_on_a_uniform_ring_is_eq1_bit_for_bit():
    geometry = rand_images(2, 20, 24, 0.2, 0.8, seed=15)
    mask = rect_mask(20, 24, (6, 12), (5, 14))
    source, source_mask = rand_images(1, 20, 24, 0.3, 0.7, seed=16), rect_mask(20, 24, (3, 9), (8, 15))
    target = torch.full((2, 20, 24, 3), 0.6)
    target[1] = torch.tensor([0.1, 0.7, 0.4])
    target[:, 8:10, 8:10] = 0.95  # under the mask: not on the ring
    for a in (0.5, 1.0):
        assert torch.equal(regional_shift(geometry, mask, source, source_mask, target, a, 2),
                           mean_shift(geometry, mask, source, source_mask, target, a, 2))
    assert torch.equal(regional_shift(geometry, mask, source, source_mask, target, 0.0, 2), geometry)


def test_regional_shift_equals_its_formula():
    """At full resolution: p + a M (sum_r K t(r) / sum_r K - c_src), K(d) = (d^2 + s^2)^-1.5 over ring pixels r."""
    geometry, mask, source, target = gradient_scene(24, 40)
    target = target + 0.1 * rand_images(1, 24, 40, 0.0, 1.0, seed=17)  # texture on the ring too
    a, width = 0.7, 2
    out = regional_shift(geometry, mask, source, mask, target, a, width, working_size=64)  # 40 px: one cell per px
    r = naive_ring(mask[0], width)
    ry, rx = torch.nonzero(r, as_tuple=True)
    c_src = source[0][naive_ring(mask[0], width)].double().mean(0)
    expected = geometry[0].double().clone()
    for y, x in torch.nonzero(mask[0] > 0).tolist():
        k = ((ry - y) ** 2 + (rx - x) ** 2 + width ** 2).double() ** -1.5
        c_tar = (k[:, None] * target[0][ry, rx].double()).sum(0) / k.sum()
        expected[y, x] += a * (c_tar - c_src)
    torch.testing.assert_close(out[0].double(), expected.clamp(0, 1), rtol=0, atol=2e-6)


def test_regional_shift_follows_a_left_to_right_gradient():
    """The patch's column means track the target's gradient (slope ~ a), where eq. 1 leaves them flat; the
    reduced working grid gives the same field as full resolution to a few thousandths."""
    geometry, mask, source, target = gradient_scene()
    inside = mask[0] > 0
    cols = torch.nonzero(inside.any(0)).flatten()
    full = regional_shift(geometry, mask, source, mask, target, 1.0, 3, working_size=128)
    coarse = regional_shift(geometry, mask, source, mask, target, 1.0, 3, working_size=16)  # 6 px cells
    assert (full - coarse)[0][inside].abs().max() < 0.02
    flat = mean_shift(geometry, mask, source, mask, target, 1.0, 3)

    def slope(image):  # least-squares slope of the patch's red column mean against the target's red
        t, p = target[0, 0, cols, 0].double(), image[0][14:34][:, cols, 0].double().mean(0)
        t, p = t - t.mean(), p - p.mean()
        return float((t * p).sum() / (t * t).sum()), float((t * p).sum() / (t.norm() * p.norm()))

    (s_regional, corr), (s_flat, _) = slope(full), slope(flat)
    assert 0.8 < s_regional < 1.2 and corr > 0.99
    assert abs(s_flat) < 0.1
    assert 0.8 < slope(regional_shift(geometry, mask, source, mask, target, 0.5, 3))[0] / 0.5 < 1.2
