"""The evaluation tool: metric formulas against hand-computed / independent values, the protocol run on tiny
models, the table format, and the message when the perceptual backbones are missing."""
import csv
import math
import sys

import harness
import numpy as np
import pytest
import torch

sys.path.insert(0, str(harness.PACK_ROOT / "scripts"))
import evaluate  # noqa: E402
from harmonizing_attention.attention import edit, metrics  # noqa: E402


def test_pixel_metrics_hand_computed():
    a = torch.zeros(1, 2, 2, 3)
    b = torch.zeros(1, 2, 2, 3)
    b[0, 0, 0] = 1.0  # one pixel differs by 255 on each channel
    b[0, 1, 1, 0] = 0.25  # another by 63.75 on the red channel only
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # the first row of pixels
    # MSE: (3 * 255^2 + 63.75^2) / 12 ; fMSE: 3 * 255^2 / (3 * 2 pixels) ; PSNR: 10 log10(255^2 / MSE)
    expected_mse = (3 * 255 ** 2 + 63.75 ** 2) / 12
    assert metrics.mse(a, b).item() == pytest.approx(expected_mse, rel=1e-12)
    assert metrics.fmse(a, b, mask).item() == pytest.approx(255 ** 2 / 2, rel=1e-12)
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(255 ** 2 / expected_mse), rel=1e-12)
    assert metrics.psnr(a, a).item() == math.inf
    assert math.isnan(metrics.fmse(a, b, torch.zeros(1, 2, 2)).item())  # no foreground


def test_pixel_metrics_match_skimage_and_a_naive_loop():
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 9, 7, 3, generator=gen), torch.rand(2, 9, 7, 3, generator=gen)
    mask = (torch.rand(2, 9, 7, generator=gen) > 0.6).float()
    got = metrics.pixel_metrics(a, b, mask)
    for i in range(2):
        x, y = a[i].double().numpy() * 255, b[i].double().numpy() * 255
        assert got["mse"][i].item() == pytest.approx(mean_squared_error(x, y), rel=1e-10)
        assert got["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=255), rel=1e-10)
        inside = [(x[r, c, ch] - y[r, c, ch]) ** 2 for r in range(9) for c in range(7) for ch in range(3)
                  if mask[i, r, c] > 0.5]
        assert got["fmse"][i].item() == pytest.approx(sum(inside) / len(inside), rel=1e-10)


def test_regions():
    image = torch.rand(1, 6, 8, 3)
    mask = torch.zeros(1, 6, 8)
    mask[0, 2:4, 3:7] = 1.0
    bg = metrics.background(image, mask)
    assert torch.equal(bg[0, 2:4, 3:7], torch.zeros(2, 4, 3))
    keep = mask[0] < 0.5
    assert torch.equal(bg[0][keep], image[0][keep])
    assert metrics.bbox(mask[0]) == (2, 4, 3, 7)
    assert torch.equal(metrics.foreground(image, mask[0]), image[:, 2:4, 3:7])
    with pytest.raises(ValueError, match="empty"):
        metrics.bbox(torch.zeros(6, 8))


def test_missing_backbones_are_reported_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no torchvision weights on disk
    found, missing = metrics.load_backbones(clip_model="harmonizing-attention-test/no-such-clip")
    assert found == {}
    assert set(missing) == {"lpips", "dists", "clip"}
    for name, package, weights in (("lpips", "lpips", "alexnet"), ("dists", "DISTS_pytorch", "vgg16")):
        # either the package is missing (what to pip install) or its pretrained backbone (where to put it)
        message = missing[name]
        assert f"package {package}" in message and "pip install" in message or weights in message.lower()
    message = missing["clip"]
    assert "no-such-clip" in message and "--allow-download" in message or "package transformers" in message


def test_centre_placement_puts_the_mask_centre_at_the_image_centre():
    mask = torch.zeros(1, 64, 64)
    mask[0, 4:14, 6:20] = 1.0
    p = evaluate.placement_for(evaluate.Settings(placement="centre"), mask, edit)
    _, geometry_mask = edit.place_source(torch.rand(1, 64, 64, 3), mask, torch.rand(1, 64, 64, 3), p)
    assert edit.mask_anchor(geometry_mask[0]) == (31.5, 31.5)
    with pytest.raises(ValueError, match="placement"):
        evaluate.placement_for(evaluate.Settings(placement="middle"), mask, edit)


def test_sources_need_masks(tmp_path):
    evaluate.save_image(torch.rand(1, 16, 16, 3), tmp_path / "crack.png")
    with pytest.raises(ValueError, match="no mask for source crack.png"):
        evaluate.load_sources(tmp_path, None, 16)
    evaluate.save_image(torch.ones(1, 16, 16, 3), tmp_path / "crack_mask.png")
    [(name, image, mask)] = evaluate.load_sources(tmp_path, None, 8)
    assert name == "crack" and image.shape == (1, 8, 8, 3) and torch.equal(mask, torch.ones(1, 8, 8))


def test_protocol_on_tiny_models(tiny, tmp_path):
    model, clip, vae = tiny["tiny-inpaint"]
    size = 64
    mask = torch.zeros(1, size, size)
    mask[0, 16:40, 20:44] = 1.0
    sources = [("noise", harness.make_image("noise:3", size, size), mask)]
    targets = [("checker", harness.make_image("checker", size, size)),
               ("gradient", harness.make_image("gradient", size, size))]
    settings = evaluate.Settings(size=size, placement="shift", shift_x=6, steps=2, iterations=1)
    messages = []
    result = evaluate.evaluate(model, clip, vae, sources, targets, tmp_path, settings,
                               clip_model="harmonizing-attention-test/no-such-clip", log=messages.append)

    columns = ["source", "target", "lpips_bg", "lpips_fg", "dists_bg", "dists_fg", "clip_bg", "clip_fg",
               "psnr", "mse", "fmse"]
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == columns
    assert [r[:2] for r in table[1:]] == [["noise", "checker"], ["noise", "gradient"], ["mean", "2 composites"]]
    for name in result["missing"]:
        assert any(m.startswith(f"{name.upper()} not computed") for m in messages)
        assert all(r[columns.index(f"{name}_bg")] == "" for r in table[1:])  # not computed: empty, not 0

    for (t_name, target), row in zip(targets, table[1:3], strict=True):
        # the naive composite, rebuilt independently: the box moved 6 px right, target elsewhere
        moved = torch.zeros(1, size, size)
        moved[0, 16:40, 26:50] = 1.0
        naive = torch.where(moved[..., None] > 0, torch.roll(sources[0][1], 6, dims=2), target)
        composite = evaluate.load_image(tmp_path / "composites" / f"noise__{t_name}.png")
        out = result["composites"][("noise", t_name)]
        assert (composite - out).abs().max() <= 0.5 / 255 + 1e-6  # the PNG is the composite, rounded
        x, y = out[0].double().numpy() * 255, naive[0].double().numpy() * 255
        mse = ((x - y) ** 2).mean()
        fmse = ((x - y) ** 2)[moved[0].numpy() > 0].mean()
        assert float(row[columns.index("mse")]) == pytest.approx(mse, rel=1e-6)
        assert float(row[columns.index("psnr")]) == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-6)
        assert float(row[columns.index("fmse")]) == pytest.approx(fmse, rel=1e-6)
    mean_psnr = (float(table[1][columns.index("psnr")]) + float(table[2][columns.index("psnr")])) / 2
    assert float(table[3][columns.index("psnr")]) == pytest.approx(mean_psnr, rel=1e-12)

    md = (tmp_path / "metrics.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(columns) + " |"
    assert md[2].startswith("| mean | 2 composites | n/a | n/a |")
    assert len([line for line in md if line.startswith("| noise |")]) == 2
    assert any(line.startswith("- LPIPS not computed") for line in md)
