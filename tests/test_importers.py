"""``minimask data import``: labelme, VIA and mask folders in, COCO's layout out.

Each format round-trips: a few images with shapes are drawn, their annotations written in the
format, imported, and read back with the COCO loader (``CocoDataset.from_root``), whose masks
must be the drawn ones. Bad input gets a message naming the file: skipped and counted (missing
image, polygon of < 3 points, a labelme file that is not JSON, a mask of the wrong size), or
fatal with a one-line CLI error and exit status 2 (a VIA file that is not JSON, nothing usable).
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from minimask.cli import main
from minimask.data.coco import CocoDataset
from minimask.data.importers import ImportFormatError, ellipse_polygon, import_dataset

H, W = 48, 64

# Per image: (category, polygon corners) drawn on it. Rectangles have whole-pixel corners, so
# their masks are exact: corners (x1, y1), (x2, y2) cover the pixels x1..x2-1, y1..y2-1.
SCENES = {
    "a": [
        ("cat", [(4, 6), (24, 6), (24, 30), (4, 30)]),
        ("dog", [(30, 10), (60, 10), (60, 40), (30, 40)]),
    ],
    "b": [("dog", [(10, 4), (50, 4), (50, 20), (10, 20)])],
    "c": [
        ("cat", [(2, 2), (12, 2), (12, 12), (2, 12)]),
        ("cat", [(40, 30), (62, 30), (62, 46), (40, 46)]),
    ],
}


def rect_mask(corners, height=H, width=W) -> np.ndarray:
    (x1, y1), (x2, y2) = corners[0], corners[2]
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def draw(stem: str) -> np.ndarray:
    """(H, W, 3) uint8: a grey background with each shape of the scene painted."""
    pixels = np.full((H, W, 3), 90, dtype=np.uint8)
    for k, (_, corners) in enumerate(SCENES[stem]):
        pixels[rect_mask(corners)] = (200, 40 + 60 * k, 30)
    return pixels


def save_image(path, stem: str) -> None:
    Image.fromarray(draw(stem)).save(path)


def write_labelme(folder, stems=tuple(SCENES), embed: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        shapes = [
            {
                "label": c,
                "points": [list(p) for p in corners],
                "group_id": None,
                "shape_type": "polygon",
                "flags": {},
            }
            for c, corners in SCENES[stem]
        ]
        data = {
            "version": "5.4.1",
            "flags": {},
            "shapes": shapes,
            "imagePath": f"{stem}.png",
            "imageData": None,
            "imageHeight": H,
            "imageWidth": W,
        }
        if stem == embed:  # the image lives only inside the JSON
            buffer = io.BytesIO()
            Image.fromarray(draw(stem)).save(buffer, format="PNG")
            data["imageData"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        else:
            save_image(folder / f"{stem}.png", stem)
        (folder / f"{stem}.json").write_text(json.dumps(data))


def via_region(category, corners, version: int) -> dict:
    xs, ys = [int(p[0]) for p in corners], [int(p[1]) for p in corners]
    attributes = {"name": category} if version == 2 else {"kind": {category: True}}
    return {
        "shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
        "region_attributes": attributes,
    }


def write_via(folder, version: int = 2, project: bool = False):
    """A VIA export: 2.x (regions a list, text attribute) or 1.x (a dict, checkbox)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for stem in SCENES:
        save_image(folder / f"{stem}.png", stem)
        regions = [via_region(c, corners, version) for c, corners in SCENES[stem]]
        if version == 1:
            regions = {str(k): r for k, r in enumerate(regions)}
        size = os.path.getsize(folder / f"{stem}.png")
        data[f"{stem}.png{size}"] = {
            "filename": f"{stem}.png",
            "size": size,
            "regions": regions,
            "file_attributes": {},
        }
    if project:
        data = {"_via_settings": {}, "_via_img_metadata": data, "_via_attributes": {}}
    path = folder / "via_region_data.json"
    path.write_text(json.dumps(data))
    return path


def blob_masks(stem: str, count: int) -> np.ndarray:
    """(count, H, W) irregular bool masks (random ellipses, one cut by a line)."""
    rng = np.random.default_rng(sum(map(ord, stem)))
    y, x = np.mgrid[0:H, 0:W]
    masks = []
    for _ in range(count):
        cx, cy = rng.uniform(12, W - 12), rng.uniform(10, H - 10)
        rx, ry = rng.uniform(4, 12), rng.uniform(4, 10)
        masks.append(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1)
    masks[0] &= x + y > masks[0].nonzero()[1].mean() + masks[0].nonzero()[0].mean()
    return np.stack(masks)


def write_mask_folders(root, drawn: dict) -> None:
    """``root/images/<stem>.png`` and ``root/masks/<stem>/<k>_<category>.png``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for stem, instances in drawn.items():
        pixels = np.full((H, W, 3), 60, dtype=np.uint8)
        (root / "masks" / stem).mkdir(parents=True, exist_ok=True)
        for k, (category, mask) in enumerate(instances):
            pixels[mask] = (220, 50 * k, 90)
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                root / "masks" / stem / f"{k}_{category}.png"
            )
        Image.fromarray(pixels).save(root / "images" / f"{stem}.png")


def loaded(out, split="train2017") -> dict:
    """``{file stem: [(category name, mask)]}`` as the COCO loader reads the import back."""
    dataset = CocoDataset.from_root(str(out), split, keep_empty=True)
    result = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        names = [dataset.classes[k] for k in sample["labels"]]
        result[os.path.splitext(sample["file_name"])[0]] = list(
            zip(names, sample["masks"].astype(bool))
        )
        assert sample["image"].shape == (3, H, W)
    return result


def assert_scenes(out, split="train2017", stems=tuple(SCENES)) -> None:
    got = loaded(out, split)
    assert sorted(got) == sorted(stems)
    for stem in stems:
        want = [(c, rect_mask(corners)) for c, corners in SCENES[stem]]
        assert [c for c, _ in got[stem]] == [c for c, _ in want], stem
        for (_, mask), (_, expected) in zip(got[stem], want):
            assert np.array_equal(mask, expected), stem


# ---------------------------------------------------------------------------- round trips
def test_labelme_round_trip(tmp_path):
    write_labelme(tmp_path / "src")
    counts = import_dataset("labelme", str(tmp_path / "src"), str(tmp_path / "out"), log=print)
    assert counts["images"] == 3 and counts["annotations"] == 5 and counts["skipped"] == 0
    assert_scenes(tmp_path / "out")
    data = json.loads((tmp_path / "out/annotations/instances_train2017.json").read_text())
    assert data["categories"] == [
        {"id": 1, "name": "cat", "supercategory": ""},
        {"id": 2, "name": "dog", "supercategory": ""},
    ]
    first = data["annotations"][0]
    assert first["bbox"] == [4.0, 6.0, 20.0, 24.0] and first["area"] == 20 * 24
    # The images are copied byte for byte.
    assert (tmp_path / "out/train2017/a.png").read_bytes() == (tmp_path / "src/a.png").read_bytes()


def test_labelme_embedded_image_groups_rectangles_and_circles(tmp_path):
    write_labelme(tmp_path / "src", stems=("b",), embed="b")
    assert not (tmp_path / "src/b.png").exists()
    data = json.loads((tmp_path / "src/b.json").read_text())
    data["shapes"] += [
        {"label": "cat", "points": [[2, 30], [10, 40]], "shape_type": "rectangle", "group_id": 7},
        {"label": "cat", "points": [[14, 30], [20, 44]], "shape_type": "rectangle", "group_id": 7},
        {"label": "dog", "points": [[40, 34], [46, 34]], "shape_type": "circle", "group_id": None},
        {"label": "dog", "points": [[1, 1]], "shape_type": "point", "group_id": None},
    ]
    (tmp_path / "src/b.json").write_text(json.dumps(data))
    messages = []
    import_dataset("labelme", str(tmp_path / "src"), str(tmp_path / "out"), log=messages.append)
    assert "1 x shape is not a region" in messages[0] and "b.json, shape 4" in messages[0]
    got = loaded(tmp_path / "out")["b"]
    assert [c for c, _ in got] == ["dog", "cat", "dog"]  # the two grouped rectangles: one cat
    two_parts = np.zeros((H, W), bool)
    two_parts[30:40, 2:10] = two_parts[30:44, 14:20] = True
    assert np.array_equal(got[1][1], two_parts)
    y, x = np.mgrid[0:H, 0:W]
    disc = (x + 0.5 - 40) ** 2 + (y + 0.5 - 34) ** 2 <= 36  # radius 6, sampled at pixel centres
    iou = (got[2][1] & disc).sum() / (got[2][1] | disc).sum()
    assert iou > 0.9, iou
    assert (tmp_path / "out/train2017/b.png").is_file()


@pytest.mark.parametrize("version, project", [(2, False), (2, True), (1, False)])
def test_via_round_trip(tmp_path, version, project):
    path = write_via(tmp_path / "src", version, project)
    counts = import_dataset("via", str(path), str(tmp_path / "out"), split="val2017")
    assert counts["annotations"] == 5 and counts["skipped"] == 0
    assert_scenes(tmp_path / "out", "val2017")
    # The folder holding the one .json reads the same.
    import_dataset("via", str(tmp_path / "src"), str(tmp_path / "out2"), split="val2017")
    assert_scenes(tmp_path / "out2", "val2017")


def test_via_balloon_style_regions_without_attributes(tmp_path):
    """matterport's balloon sample: VIA 1.x, empty region_attributes, rect and ellipse too."""
    path = write_via(tmp_path / "src", version=1)
    data = json.loads(path.read_text())
    for entry in data.values():
        for region in entry["regions"].values():
            region["region_attributes"] = {}
    entry = data[next(k for k in data if k.startswith("b.png"))]
    entry["regions"]["1"] = {
        "shape_attributes": {"name": "rect", "x": 2, "y": 30, "width": 8, "height": 10},
        "region_attributes": {},
    }
    entry["regions"]["2"] = {
        "shape_attributes": {"name": "ellipse", "cx": 40, "cy": 36, "rx": 8, "ry": 4, "theta": 0.3},
        "region_attributes": {},
    }
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="(?s)no usable region.*region without a category"):
        import_dataset("via", str(path), str(tmp_path / "out"), log=lambda line: None)
    assert not (tmp_path / "out").exists()  # nothing written
    import_dataset("via", str(path), str(tmp_path / "out"), default_category="balloon")
    got = loaded(tmp_path / "out")
    assert {c for v in got.values() for c, _ in v} == {"balloon"}
    assert len(got["b"]) == 3 and np.array_equal(got["b"][1][1], rect_mask([(2, 30), 0, (10, 40)]))
    y, x = np.mgrid[0:H, 0:W]
    u, v = x + 0.5 - 40, y + 0.5 - 36
    c, s = np.cos(0.3), np.sin(0.3)
    ellipse = ((c * u + s * v) / 8) ** 2 + ((-s * u + c * v) / 4) ** 2 <= 1
    iou = (got["b"][2][1] & ellipse).sum() / (got["b"][2][1] | ellipse).sum()
    assert iou > 0.85, iou


def test_mask_folders_round_trip_exactly(tmp_path):
    drawn = {
        "one": list(zip(["cup", "plate"], blob_masks("one", 2))),
        "two": list(zip(["cup", "cup", "fork"], blob_masks("two", 3))),
        "empty": [],
    }
    write_mask_folders(tmp_path / "src", drawn)
    counts = import_dataset("masks", str(tmp_path / "src"), str(tmp_path / "out"))
    assert counts == {**counts, "images": 3, "annotations": 5, "categories": 3, "skipped": 0}
    got = loaded(tmp_path / "out")
    for stem, instances in drawn.items():
        assert [c for c, _ in got[stem]] == [c for c, _ in instances]
        for (_, mask), (_, expected) in zip(got[stem], instances):
            assert np.array_equal(mask, expected)
    data = json.loads((tmp_path / "out/annotations/instances_train2017.json").read_text())
    first = data["annotations"][0]
    ys, xs = np.nonzero(drawn["one"][0][1])
    assert first["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    assert first["area"] == drawn["one"][0][1].sum()


def test_categories_fix_the_ids_and_leave_other_names_out(tmp_path):
    write_labelme(tmp_path / "src")
    messages = []
    counts = import_dataset(
        "labelme",
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        categories="dog,bird",
        log=messages.append,
    )
    data = json.loads((tmp_path / "out/annotations/instances_train2017.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "dog"), (2, "bird")]
    assert counts["annotations"] == 2 and {a["category_id"] for a in data["annotations"]} == {1}
    assert "3 x category not in --categories" in messages[0] and "'cat'" in messages[0]


def test_exif_rotated_photo_is_written_as_annotated(tmp_path):
    """labelme annotates the photo as shown (EXIF-rotated); minimask reads pixels as stored."""
    src = tmp_path / "src"
    write_labelme(src, stems=("a",))
    stored = np.ascontiguousarray(np.rot90(draw("a"), k=1))  # (W, H, 3): shown turned back
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    Image.fromarray(stored).save(src / "a.jpg", quality=98, exif=exif.tobytes())
    data = json.loads((src / "a.json").read_text())
    data["imagePath"] = "a.jpg"
    (src / "a.json").write_text(json.dumps(data))
    import_dataset("labelme", str(src), str(tmp_path / "out"))
    written = np.asarray(Image.open(tmp_path / "out/train2017/a.jpg"))
    assert written.shape == (H, W, 3)
    assert np.abs(written.astype(int) - draw("a")).mean() < 8  # the same picture, upright


# ---------------------------------------------------------------------------- bad input
def test_bad_labelme_files_are_skipped_and_named(tmp_path):
    src = tmp_path / "src"
    write_labelme(src)
    (src / "c.png").unlink()  # missing image
    data = json.loads((src / "b.json").read_text())
    data["shapes"].append({"label": "cat", "points": [[1, 1], [5, 5]], "shape_type": "polygon"})
    (src / "b.json").write_text(json.dumps(data))  # a polygon of 2 points
    (src / "broken.json").write_text('{"shapes": [')  # not JSON
    data = json.loads((src / "a.json").read_text())
    data["imageWidth"] = 100  # the file is 64 wide
    (src / "a2.json").write_text(json.dumps({**data, "imagePath": "a.png"}))
    messages = []
    counts = import_dataset("labelme", str(src), str(tmp_path / "out"), log=messages.append)
    summary = messages[0]
    assert counts["images"] == 2 and counts["skipped"] == 4
    assert f"missing image file {src / 'c.png'} (named by {src / 'c.json'})" in summary
    assert f"{src / 'b.json'}, shape 1 ('cat', polygon): a polygon of 2 points" in summary
    assert f"{src / 'broken.json'} is not valid JSON" in summary
    assert f"{src / 'a.png'} is 64x48 pixels but {src / 'a2.json'} says 100x48" in summary
    assert_scenes(tmp_path / "out", stems=("a", "b"))  # the rest imported as drawn


def test_mask_size_mismatch_and_names_are_reported(tmp_path):
    src = tmp_path / "src"
    write_mask_folders(src, {"one": list(zip(["cup", "plate"], blob_masks("one", 2)))})
    Image.fromarray(np.ones((10, 10), np.uint8)).save(src / "masks/one/2_cup.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(src / "masks/one/3_cup.png")
    Image.fromarray(np.ones((H, W), np.uint8)).save(src / "masks/one/nocategory.png")
    (src / "masks/ghost").mkdir()
    messages = []
    counts = import_dataset("masks", str(src), str(tmp_path / "out"), log=messages.append)
    assert counts["annotations"] == 2 and counts["skipped"] == 4
    summary = messages[0]
    assert f"{src / 'masks/one/2_cup.png'} is 10x10 pixels but its image is 64x48" in summary
    assert f"{src / 'masks/one/3_cup.png'} has no pixel set" in summary
    assert f"{src / 'masks/one/nocategory.png'}: name masks <instance>_<category>.png" in summary
    assert f"{src / 'masks/ghost'}: no image ghost.*" in summary


def test_fatal_sources_raise_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportFormatError, match="no labelme .json file in .*empty"):
        import_dataset("labelme", str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ImportFormatError, match="no via source at .*absent"):
        import_dataset("via", str(tmp_path / "absent"), str(tmp_path / "out"))
    bad = tmp_path / "via.json"
    bad.write_text("{not json")
    with pytest.raises(ImportFormatError, match=r"via\.json is not valid JSON"):
        import_dataset("via", str(bad), str(tmp_path / "out"))
    bad.write_text(json.dumps({"project": {}, "file": {}, "metadata": {}, "config": {}}))
    with pytest.raises(ImportFormatError, match="is a VIA 3 project"):
        import_dataset("via", str(bad), str(tmp_path / "out"))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ImportFormatError, match="is not a VIA 1.x/2.x export"):
        import_dataset("via", str(bad), str(tmp_path / "out"))
    with pytest.raises(ImportFormatError, match="has no images/ folder"):
        import_dataset("masks", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_polygon_helper_is_on_the_ellipse():
    xy = np.asarray(ellipse_polygon(10, 20, 5, 3, theta=0.5)).reshape(-1, 2)
    c, s = np.cos(0.5), np.sin(0.5)
    u, v = xy[:, 0] - 10, xy[:, 1] - 20
    assert np.allclose(((c * u + s * v) / 5) ** 2 + ((-s * u + c * v) / 3) ** 2, 1)


# ---------------------------------------------------------------------------- the command line
def test_cli_imports_and_errors_in_one_line(tmp_path, capsys):
    write_labelme(tmp_path / "src")
    out = tmp_path / "out"
    assert (
        main(["data", "import", "--from", "labelme", str(tmp_path / "src"), "--out", str(out)]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert_scenes(out)
    (tmp_path / "via.json").write_text("{not json")
    for argv, expected in [
        (["--from", "via", str(tmp_path / "via.json")], "via.json is not valid JSON"),
        (["--from", "masks", str(tmp_path / "src")], "has no images/ folder"),
        (["--from", "labelme", str(tmp_path / "nowhere")], "no labelme source at"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["data", "import", *argv, "--out", str(tmp_path / "out2")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("minimask data import: ") and expected in err, err
    assert not (tmp_path / "out2").exists()


def test_imported_data_trains_with_the_cli(tmp_path, capsys):
    write_labelme(tmp_path / "src")
    main(
        [
            "data",
            "import",
            "--from",
            "labelme",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "data"),
        ]
    )
    status = main(
        [
            "train",
            "--dataset",
            "coco",
            "--root",
            str(tmp_path / "data"),
            "--iterations",
            "2",
            "--batch-size",
            "1",
            "--warmup",
            "1",
            "--min-size",
            "64",
            "--max-size",
            "64",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert status == 0
    assert (tmp_path / "run/checkpoint.npz").is_file()
    assert "2 classes" in capsys.readouterr().out
