"""The detail-preserving composite: target bit for bit outside the blend band, the decoded image inside M_geo,
the Laplacian-pyramid blend against the textbook two-pyramid formula, and the node in a whole graph."""
import pytest
import torch
import torch.nn.functional as F

import harness
from harmonizing_attention.attention import composite as comp


def _masks(h: int, w: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    crack = ((y - (0.4 * x + 10)).abs() < 1.0).float()  # a 1-2 px wide diagonal line
    dots = torch.zeros(h, w)
    dots[torch.randint(0, h, (12,), generator=gen), torch.randint(0, w, (12,), generator=gen)] = 1.0
    border = torch.zeros(h, w)
    border[:9, w - 14:] = 1.0  # touches two sides
    soft = torch.exp(-((y - h / 2) ** 2 + (x - w / 3) ** 2) / 60.0)  # binarized at 0.5
    return {"crack": crack, "dots": dots, "border": border, "soft": soft}


@pytest.mark.parametrize(("feather", "levels"), [(0.0, 0), (4.0, 3), (2.5, 5)])
def test_target_outside_the_band_decoded_inside_the_mask(feather, levels):
    h, w = 72, 100  # not multiples of 2^levels: the pyramid pads
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(4, h, w, 3, generator=gen)
    decoded = (target + 0.1 * torch.randn(4, h, w, 3, generator=gen)).clamp(0, 1)
    masks = torch.stack(list(_masks(h, w).values()))
    out = comp.composite(decoded, target, masks, feather, levels)
    band = comp.blend_band(masks, feather, levels)
    inside = masks >= 0.5
    assert out.shape == target.shape and out.dtype == target.dtype
    assert torch.equal(out[~band], target[~band])  # bit for bit
    assert torch.equal(out[inside], decoded[inside])
    assert (band & ~inside).any() == (feather > 0 or levels > 0)
    assert not band.all()
    # the band is where the blend can reach: the mask dilated by at most feather + the pyramid's reach
    reach = int(torch.tensor(feather).ceil()) + (4 * 2 ** levels if levels else 0)
    grown = F.max_pool2d(inside.float()[:, None], 2 * reach + 1, stride=1, padding=reach)[:, 0] > 0
    assert not (band & ~grown).any()


def test_blend_equals_the_two_pyramid_formula():
    """collapse(A_l L_l(D) + (1 - A_l) L_l(T)) (Burt-Adelson), computed independently on both images, equals
    T + the residual blend; all-one weights give D back (the pyramid telescopes); 0 levels is a feathered blend."""
    h, w = 64, 48
    gen = torch.Generator().manual_seed(2)
    d, t = torch.rand(1, 3, h, w, generator=gen, dtype=torch.float64), torch.rand(1, 3, h, w, generator=gen,
                                                                                   dtype=torch.float64)
    alpha = comp.feathered(_masks(h, w)["crack"][None, None], 3.0).double()
    levels = 3

    def laplacians(x):
        g = [x]
        for _ in range(levels):
            g.append(comp._reduce(g[-1]))
        return [g[i] - comp._expand(g[i + 1]) for i in range(levels)] + [g[-1]]

    weights = [alpha]
    for _ in range(levels):
        weights.append(comp._reduce(weights[-1]))
    blended = [a * ld + (1 - a) * lt for a, ld, lt in zip(weights, laplacians(d), laplacians(t), strict=True)]
    out = blended[-1]
    for level in range(levels - 1, -1, -1):
        out = blended[level] + comp._expand(out)
    assert torch.allclose(t + comp._blend(d - t, alpha, levels), out, atol=1e-12)
    assert torch.allclose(comp._blend(d - t, torch.ones_like(alpha), levels), d - t, atol=1e-12)
    assert torch.equal(comp._blend(d - t, alpha, 0), alpha * (d - t))


def test_feathered_weights():
    mask = torch.zeros(1, 1, 21, 21)
    mask[..., 10, 10] = 1.0
    alpha = comp.feathered(mask, 3.0)[0, 0]
    assert alpha[10, 10] == 1 and alpha[10, 11] == 0.75 and alpha[10, 13] == 0.25 and alpha[10, 14] == 0
    # octagonal steps: the square first (diagonal neighbours), then the cross
    assert alpha[11, 11] == 0.75 and alpha[12, 11] == 0.5 and alpha[12, 12] == 0.25
    assert torch.equal(comp.feathered(mask, 0.0), mask)


def test_errors_name_the_sizes():
    with pytest.raises(ValueError, match="64x32, the target 64x64"):
        comp.composite(torch.rand(1, 32, 64, 3), torch.rand(1, 64, 64, 3), torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="batch sizes"):
        comp.composite(torch.rand(2, 8, 8, 3), torch.rand(3, 8, 8, 3), torch.zeros(1, 8, 8))


def test_node_in_the_geometry_graph(tiny):
    """The decoded composite of a whole geometry transfer through the node: the target image's own pixels
    outside blend_mask, the decoded pixels inside M_geo."""
    from test_pipeline import graph

    prompt = graph()
    prompt["16"] = {"class_type": "HA_DetailPreservingComposite", "inputs": {
        "image": ["11", 0], "target": ["5", 0], "mask": ["6", 1], "feather": 3.0, "levels": 2}}
    prompt["12"] = {"class_type": "HATest_Keep", "inputs": {"value": ["16", 0]}}
    out = harness.run_prompt(prompt)
    decoded, target, geo_mask = out["11"][0], out["5"][0], out["6"][1]
    image, band = out["16"]
    assert image.shape == target.shape == (1, 64, 64, 3)
    outside, inside = band < 0.5, geo_mask >= 0.5
    assert outside.sum() > 64 * 64 // 4 and torch.equal(image[outside], target[outside])
    assert torch.equal(image[inside], decoded[inside])
    assert not torch.equal(decoded[outside], target[outside])  # the VAE round trip the node removes

    wrong = {
        "1": {"class_type": "HATest_Image", "inputs": {"name": "checker", "width": 64, "height": 64}},
        "2": {"class_type": "HATest_Image", "inputs": {"name": "gradient", "width": 72, "height": 64}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 72, "height": 64}},
        "4": {"class_type": "HA_DetailPreservingComposite", "inputs": {
            "image": ["1", 0], "target": ["2", 0], "mask": ["3", 0], "feather": 4.0, "levels": 3}},
        "5": {"class_type": "HATest_Keep", "inputs": {"value": ["4", 0]}},
    }
    with pytest.raises(harness.PromptError, match="image is 64x64 .* but target is 72x64"):
        harness.run_prompt(wrong)
