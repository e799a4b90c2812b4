"""The dataset runner (scripts/dataset.py): a manifest of 6 items through the shipped geometry workflow on a tiny
checkpoint file, embedded and on a local Ray cluster of 2 workers (same files), resumed (nothing to do), labels
read back with pycocotools; corrupt items reported while the others finish; region placements and RLE exact."""
import json
import sys

import pytest
import torch

import harness

sys.path.insert(0, str(harness.PACK_ROOT / "scripts"))
import dataset  # noqa: E402
import evaluate  # noqa: E402
from harmonizing_attention.attention import edit, region  # noqa: E402

SIZE = 64
FAST = ["8.steps=2", "8.renoise_iterations=1"]
NO_COCO = 'pycocotools is not installed (pip install "comfyui-harmonizing-attention[test]")'


def _images(folder):
    evaluate.save_image(harness.make_image("noise:3", SIZE, SIZE), folder / "src.png")
    evaluate.save_image(harness.make_image("checker", SIZE, SIZE), folder / "checker.png")
    evaluate.save_image(harness.make_image("gradient", SIZE, SIZE), folder / "gradient.png")
    mask = torch.zeros(1, SIZE, SIZE, 3)
    mask[0, 20:30, 10:34] = 1.0
    evaluate.save_image(mask, folder / "src_mask.png")
    lower = torch.zeros(1, SIZE, SIZE, 3)
    lower[0, 32:, :] = 1.0  # the lower half: where the geometry may land
    evaluate.save_image(lower, folder / "region.png")
    evaluate.save_image(torch.zeros(1, SIZE, SIZE, 3), folder / "empty_mask.png")


@pytest.fixture(scope="module")
def ckpt(comfy):
    import comfy_server

    return comfy_server.tiny_checkpoint(9)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """6 items: a given placement, 3 copies drawn inside a region (scale and rotation ranges), 2 drawn shifts and
    colour strengths; JSON Lines."""
    folder = tmp_path_factory.mktemp("manifest")
    _images(folder)
    rows = [
        {"id": "given", "source": "src.png", "source_mask": "src_mask.png", "target": "checker.png",
         "shift_x": 6, "shift_y": -4, "color_strength": 0.25},
        {"id": "inregion", "source": "src.png", "source_mask": "src_mask.png", "target": "gradient.png",
         "target_region": "region.png", "scale": [0.8, 1.2], "rotation": [-20, 20], "seed": 7, "copies": 3,
         "category": "tiles", "defect": "crack"},
        {"id": "drawn", "source": "src.png", "source_mask": "src_mask.png", "target": "gradient.png",
         "color_strength": [0, 1], "shift_x": [-8, 8], "seed": 3, "copies": 2},
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in (".hashes.json", "failed.jsonl")}


@pytest.fixture(scope="module")
def embedded_run(manifest, ckpt, tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("embedded")
    summary = dataset.run(manifest, out, ckpt=str(ckpt), overrides=FAST, cpu=True, threads=1, progress=False,
                          log=lambda *_: None)
    return out, summary


def test_embedded_run_writes_composites_masks_and_labels(embedded_run, manifest):
    import numpy as np
    from PIL import Image

    COCO = pytest.importorskip("pycocotools.coco", reason=NO_COCO).COCO
    out, summary = embedded_run
    assert summary["done"] == 6 and summary["failed"] == [] and summary["skipped"] == 0
    coco = COCO(str(out / "coco.json"))
    assert len(coco.getImgIds()) == 6
    names = {c["name"]: c["supercategory"] for c in coco.loadCats(coco.getCatIds())}
    assert names == {"crack": "tiles", "src": "dataset"}
    lower = np.asarray(Image.open(manifest.parent / "region.png").convert("L")) > 127
    for image in coco.loadImgs(coco.getImgIds()):
        record = json.loads((out / "items" / f"{image['item']}.json").read_text())
        written = np.asarray(Image.open(out / record["mask"])) > 127  # MVTec ground truth, 0/255
        [ann] = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert np.array_equal(coco.annToMask(ann).astype(bool), written)  # labels load back and match
        assert ann["area"] == written.sum() > 0
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(written)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        composite = np.asarray(Image.open(out / image["file_name"]))
        assert composite.shape == (SIZE, SIZE, 3) and image["file_name"] == record["image"]
        if record["target_region"]:
            assert not (written & ~lower).any()  # the whole moved mask inside the region
        provenance = record["provenance"]
        assert provenance["pack_version"] == dataset.pack_version() and len(provenance["model_sha256"]) == 64
        assert provenance["overrides"] == FAST and provenance["prompt"]["8"]["inputs"]["steps"] == 2
    given = json.loads((out / "items" / "given_000.json").read_text())
    assert given["placement"] == {"shift_x": 6.0, "shift_y": -4.0, "scale": 1.0, "rotation": 0.0}
    assert given["provenance"]["prompt"]["7"]["inputs"]["strength"] == 0.25
    placements = {json.dumps(json.loads((out / "items" / f"inregion_00{i}.json").read_text())["placement"])
                  for i in range(3)}
    assert len(placements) == 3  # each copy its own draw
    assert (out / "tiles/test/crack/inregion_000.png").is_file()
    assert (out / "tiles/ground_truth/crack/inregion_000_mask.png").is_file()


def test_second_run_does_nothing(embedded_run, manifest, ckpt, monkeypatch):
    out, _ = embedded_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    monkeypatch.setattr(dataset, "Worker", None)  # would fail if any item ran
    summary = dataset.run(manifest, out, ckpt=str(ckpt), overrides=FAST, cpu=True, progress=False, log=lambda *_: None)
    assert summary == {"items": 6, "skipped": 6, "done": 0, "failed": []}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


def test_ray_with_two_workers_writes_the_same_files(embedded_run, manifest, ckpt, tmp_path):
    pytest.importorskip("ray", reason='Ray is not installed (pip install "comfyui-harmonizing-attention[ray]")')
    out, _ = embedded_run
    summary = dataset.run(manifest, tmp_path, engine="ray", workers=2, ckpt=str(ckpt), overrides=FAST, cpu=True,
                          threads=1, progress=False, log=lambda *_: None)
    assert summary["done"] == 6 and summary["failed"] == []
    embedded, ray = _files(out), _files(tmp_path)
    assert sorted(embedded) == sorted(ray) and len(embedded) == 6 * 3 + 1
    assert [name for name in embedded if embedded[name] != ray[name]] == []


def _bad_files(folder):
    """A truncated PNG (its last 40 % cut: ComfyUI's LoadImage would load it with black rows), a PNG with garbage
    after its signature (LoadImage's retry fails with "'ascii' codec can't decode byte 0xd2"), a region of the wrong
    size."""
    evaluate.save_image(harness.make_image("noise:5", SIZE, SIZE), folder / "truncated.png")
    whole = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) * 3 // 5])
    evaluate.save_image(harness.make_image("noise:6", SIZE, SIZE), folder / "garbage.png")
    whole = (folder / "garbage.png").read_bytes()
    (folder / "garbage.png").write_bytes(whole[:8] + b"\xd2" * 16 + whole[24:])
    evaluate.save_image(torch.ones(1, SIZE // 2, SIZE // 2, 3), folder / "small_region.png")


def test_corrupt_items_are_reported_and_the_others_finish(tmp_path, ckpt, single_thread, monkeypatch):
    """Every bad file is found before any model work and reported with its manifest line and file; nothing is
    written for its item, the others run, and a re-run tries the bad items again (here after the files are fixed)."""
    _images(tmp_path)
    _bad_files(tmp_path)
    (tmp_path / "m.csv").write_text(
        "id,source,source_mask,target,target_region,shift_x\n"
        "ok,src.png,src_mask.png,checker.png,,2..5\n"
        "missing,src.png,src_mask.png,no_such_target.png,,0\n"
        "empty,src.png,empty_mask.png,checker.png,,0\n"
        "truncated,src.png,src_mask.png,truncated.png,,0\n"
        "garbage,garbage.png,src_mask.png,checker.png,,0\n"
        "region,src.png,src_mask.png,checker.png,small_region.png,\n")
    ran = []
    run_prompt = dataset.comfy_runtime.run_prompt
    monkeypatch.setattr(dataset.comfy_runtime, "run_prompt", lambda prompt, *a, **k: ran.append(prompt) or
                        run_prompt(prompt, *a, **k))
    out = tmp_path / "out"
    summary = dataset.run(tmp_path / "m.csv", out, ckpt=str(ckpt), overrides=FAST, cpu=True, threads=1,
                          progress=False, log=lambda *_: None)
    assert summary["done"] == 1 and len(ran) == 1  # the workflow ran for "ok" alone
    errors = {f["id"]: f["error"] for f in summary["failed"]}
    assert set(errors) == {"missing_000", "empty_000", "truncated_000", "garbage_000", "region_000"}
    expected = {
        "missing_000": (3, "no_such_target.png not found"),
        "empty_000": (4, "empty_mask.png is empty"),
        "truncated_000": (5, f"target {tmp_path / 'truncated.png'} is truncated"),
        "garbage_000": (6, f"source {tmp_path / 'garbage.png'} cannot be decoded as an image"),
        "region_000": (7, f"target_region {tmp_path / 'small_region.png'} is 32x32 but target "
                          f"{tmp_path / 'checker.png'} is 64x64"),
    }
    for item, (line, text) in expected.items():
        assert errors[item].startswith(f"m.csv line {line}: ") and text in errors[item], errors[item]
    logged = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert {f["id"]: f["line"] for f in logged} == {item: line for item, (line, _) in expected.items()}
    written = {p.name for p in out.rglob("*") if p.is_file()}
    assert not any(name.startswith(tuple(errors)) for name in written)  # nothing of a bad item
    assert json.loads((out / "coco.json").read_text())["images"][0]["item"] == "ok_000"

    evaluate.save_image(harness.make_image("noise:5", SIZE, SIZE), tmp_path / "truncated.png")  # the files fixed
    evaluate.save_image(harness.make_image("noise:6", SIZE, SIZE), tmp_path / "garbage.png")
    (tmp_path / "region.png").replace(tmp_path / "small_region.png")
    ran.clear()
    summary = dataset.run(tmp_path / "m.csv", out, ckpt=str(ckpt), overrides=FAST, cpu=True, threads=1,
                          progress=False, log=lambda *_: None)
    assert summary["skipped"] == 1 and summary["done"] == 3 and len(ran) == 3  # the fixed three retried
    assert {f["id"] for f in summary["failed"]} == {"missing_000", "empty_000"}
    assert {i["item"] for i in json.loads((out / "coco.json").read_text())["images"]} == \
        {"ok_000", "truncated_000", "garbage_000", "region_000"}


def test_rle_matches_pycocotools():
    import numpy as np

    mask_api = pytest.importorskip("pycocotools.mask", reason=NO_COCO)
    gen = np.random.default_rng(0)
    cases = [gen.random((37, 23)) > 0.7, np.zeros((5, 4), bool), np.ones((5, 4), bool), np.eye(40, 33, dtype=bool)]
    cases[0][0, 0] = True  # a run of ones first: counts start with 0
    for mask in cases:
        ours = dataset.rle_encode(mask)
        theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
        assert np.array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)


def test_region_shifts_are_exactly_the_placements_inside():
    """Every integer shift, placed with edit.place_source: the candidates are exactly those inside the region."""
    src = torch.zeros(16, 16)
    src[3:6, 2:9] = 1.0
    room = torch.zeros(16, 16)
    room[5:16, 3:16] = 1.0
    room[12, 10] = 0.0  # a hole the mask must avoid
    for scale, rotation in ((1.0, 0.0), (1.25, 90.0)):
        base, offsets, area = region.candidate_shifts(src, room, scale, rotation)
        brute = {(dx, dy) for dy in range(-16, 17) for dx in range(-16, 17)
                 if region.fits(src, room, edit.Placement(base.shift_x + dx, base.shift_y + dy, scale, rotation), area)}
        assert {tuple(o) for o in offsets.tolist()} == brute and brute
    with pytest.raises(ValueError, match="empty"):
        region.candidate_shifts(src, torch.zeros(16, 16))


def test_draws_depend_on_seed_and_copy_only():
    src = torch.zeros(32, 32)
    src[2:6, 3:12] = 1.0
    room = torch.zeros(32, 32)
    room[16:, 8:] = 1.0
    item = {"seed": 5, "copy": 0, "scale": [0.8, 1.2], "rotation": [-30, 30], "color_strength": [0, 1]}
    first = dataset.draw(item, src, room)
    assert dataset.draw(dict(item), src, room) == first
    assert dataset.draw({**item, "copy": 1}, src, room) != first
    _, _, area = region.candidate_shifts(src, room, first[0].scale, first[0].rotation)
    assert region.fits(src, room, first[0], area) and 0 <= first[1] <= 1
    with pytest.raises(ValueError, match="cannot hold"):
        tight = torch.zeros(32, 32)
        tight[30:, :4] = 1.0
        dataset.draw(item, src, tight)


@pytest.mark.parametrize(("line", "message"), [
    ('{"source": "a.png", "source_mask": "m.png", "target": "t.png", "shfit_x": 1}', "unknown column"),
    ('{"source": "a.png", "source_mask": "m.png", "target": "t.png", "scale": [2, 1]}', "reversed"),
    ('{"source": "a.png", "source_mask": "m.png", "target": "t.png", "shift_x": 1, "target_region": "r.png"}',
     "either shift_x/shift_y or target_region"),
    ('{"source": "a.png", "target": "t.png"}', "source_mask missing"),
    ('{"source": "a.png", "source_mask": "m.png", "target": "t.png", "rotation": "left"}', "neither a number"),
])
def test_manifest_errors_name_the_line_and_the_fix(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text("\n" + line + "\n")
    with pytest.raises(dataset.ManifestError, match=message) as err:
        dataset.expand(dataset.read_manifest(path), tmp_path)
    assert "line 2" in str(err.value)
