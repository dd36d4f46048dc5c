"""``minimask data subset``: a smaller COCO dataset in the official layout.

From an annotation file and its image folder, keep

* the chosen categories (names or ids; default all), and only their annotations;
* non-crowd annotations whose ``area`` (COCO's mask area, in pixels) is at least ``min_area``;
  crowd regions of the chosen categories are kept whatever their area, because without them
  the people in a crowd would count as background;
* the images holding at least one kept non-crowd annotation, in image-id order, at most
  ``max_images`` of them (an image whose file is missing is skipped, counted, and replaced by
  the next one);

and write ``OUT/annotations/instances_<split>.json`` (``info``, ``licenses``, ``images``,
``annotations``, ``categories``) plus a copy of each image in ``OUT/<split>/``. The result loads
with ``pycocotools.coco.COCO`` and with :class:`minimask.data.coco.CocoDataset.from_root`.
Annotations are copied as they are (bad ones included): cleaning happens when they are read.
An empty selection, or an ``OUT`` that would overwrite the input, is refused before anything is
written.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from minimask.data.coco import DataProblems, category_names, choose_categories, load_coco_json


def split_name(annotation_file: str, image_dir: str) -> str:
    """``val2017`` from ``instances_val2017.json``, else the image folder's name."""
    match = re.fullmatch(r"instances_(.+)\.json", os.path.basename(annotation_file))
    return match.group(1) if match else os.path.basename(os.path.normpath(image_dir))


def build_subset(annotation_file: str, image_dir: str, out_dir: str, categories=None,
                 max_images: int | None = None, min_area: float = 0.0, split: str | None = None,
                 progress: bool = True, log=print) -> dict:  # fmt: skip
    """Write the subset described in the module docstring; returns what it wrote (counts)."""
    data = load_coco_json(annotation_file)
    known = category_names(data["categories"], annotation_file)
    chosen = set(choose_categories(known, categories, annotation_file))
    split = split or split_name(annotation_file, image_dir)

    def kept(ann) -> bool:
        if ann.get("category_id") not in chosen:
            return False
        area = ann["area"] if "area" in ann else _box_area(ann.get("bbox"))
        return bool(ann.get("iscrowd", 0)) or area >= min_area

    anns_of: dict = {}
    for ann in data["annotations"]:
        if kept(ann):
            anns_of.setdefault(ann.get("image_id"), []).append(ann)
    problems = DataProblems(f"subset of {annotation_file}")
    images = []
    for image in sorted(data["images"], key=lambda im: im.get("id", -1)):
        if max_images is not None and len(images) >= max_images:
            break
        if not any(not a.get("iscrowd", 0) for a in anns_of.get(image.get("id"), ())):
            continue
        source = os.path.join(image_dir, image.get("file_name", ""))
        if not os.path.isfile(source):
            problems.add("missing image file", f"{source} (image id {image.get('id')})")
            continue
        images.append(image)

    if not images:
        why = f"; {problems.summary()}" if problems else ""
        raise ValueError(
            f"no image of {annotation_file} holds a kept annotation with its file in {image_dir}"
            f" (categories {sorted(chosen)[:5]}, min area {min_area}){why}: nothing written"
        )
    path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    _refuse_overwriting_inputs(path, os.path.join(out_dir, split), annotation_file, image_dir)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    bar = images
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(images, desc="copy images", dynamic_ncols=True)
    for image in bar:
        target = os.path.join(out_dir, split, image["file_name"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(image_dir, image["file_name"]), target)

    ids = {image["id"] for image in images}
    subset = {
        "info": data.get("info", {}),
        "licenses": data.get("licenses", []),
        "images": images,
        "annotations": [a for i in sorted(ids) for a in anns_of[i]],
        "categories": [c for c in data["categories"] if c.get("id") in chosen],
    }
    with open(path, "w") as f:
        json.dump(subset, f)
    if problems:
        log(problems.summary())
    counts = {k: len(subset[k]) for k in ("images", "annotations", "categories")}
    log(f"wrote {path} ({counts['images']} images, {counts['annotations']} annotations, "
        f"{counts['categories']} categories) and {os.path.join(out_dir, split)}/")  # fmt: skip
    return {**counts, "skipped": sum(problems.counts.values()), "annotation_file": path}


def _box_area(bbox) -> float:
    try:
        return float(bbox[2]) * float(bbox[3])
    except (TypeError, IndexError, ValueError):
        return 0.0


def _refuse_overwriting_inputs(json_out: str, images_out: str, annotation_file: str,
                               image_dir: str) -> None:  # fmt: skip
    """Refuse an output that would overwrite the input annotation file or copy images onto
    themselves (``--out`` equal to the source root), before anything is written."""
    same = os.path.realpath
    if os.path.exists(json_out) and os.path.samefile(json_out, annotation_file):
        raise ValueError(f"--out would overwrite the input {annotation_file}: choose another "
                         "folder")  # fmt: skip
    if same(images_out) == same(image_dir):
        raise ValueError(f"--out would copy the images of {image_dir} onto themselves: choose "
                         "another folder")  # fmt: skip
