"""``minimask data import``: your own annotations, written in COCO's layout.

Three sources, each turned into the layout :class:`minimask.data.coco.CocoDataset` reads (and so
``minimask train --dataset coco --root OUT``)::

    OUT/annotations/instances_<split>.json     images, annotations, categories
    OUT/<split>/<file_name>                    a copy of each image

**labelme** (``SRC`` a folder of labelme ``.json`` files, or one file). Each file describes one
image: ``imagePath`` (relative to the JSON file), ``imageHeight``, ``imageWidth``, optionally
``imageData`` (the image file itself, base64; used when ``imagePath`` is missing), and ``shapes``,
each ``{label, points: [[x, y], ...], shape_type, group_id}``. A ``polygon`` is an instance; a
``rectangle`` (two corners) and a ``circle`` (centre, then a point on it) become polygons; shapes
with the same label and ``group_id`` (not null) are one instance of several polygons; lines and
points mark no region and are skipped.

**via** (``SRC`` a VGG Image Annotator export, or a folder holding exactly one ``.json``, with
the images beside it, as matterport's balloon sample). VIA 2.x writes ``{key: {filename, size,
regions: [...]}}`` (or a project with that dict under ``_via_img_metadata``); VIA 1.x writes
``regions`` as a dict ``{"0": ..., "1": ...}``: both read. A region is ``{shape_attributes,
region_attributes}``; ``polygon`` (``all_points_x``, ``all_points_y``), ``rect`` (``x, y, width,
height``), ``circle`` (``cx, cy, r``) and ``ellipse`` (``cx, cy, rx, ry[, theta]``) are
instances. Its category is the value of one region attribute: ``attribute`` names it, or else the
only attribute the region has (a checkbox attribute ``{name: true}`` gives its one ticked name);
a region with no attribute gets ``default_category`` (balloon: ``--default-category balloon``).
VIA's ``size`` is the file's size in bytes, so the image's pixel size is read from the file.

**masks** (``SRC`` a folder of two folders)::

    SRC/images/<stem>.<png|jpg|jpeg|bmp|tif|tiff>
    SRC/masks/<stem>/<instance>_<category>.png       one PNG per instance, the image's size

``<stem>`` ties the masks to their image; in a mask's name, the text after the **last**
underscore is its category (``0_cup.png``, ``left_cup.png``: a cup; so a category name has no
underscore), and the text before it only tells instances apart. A pixel belongs to the instance
when it is not 0 (in any colour channel). An image with no mask folder is an image with no
object.

What is written: image ids 1..N in file-name order; one annotation per instance, ids 1..A, with
``iscrowd`` 0, ``bbox`` ``[x, y, w, h]`` and ``area`` (the pixels of its mask, as COCO counts).
Polygons stay polygons (``segmentation: [[x1, y1, x2, y2, ...], ...]``, in pixel coordinates:
pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``, so a rectangle with corners (10, 10) and (30, 20)
covers 20 × 10 pixels) and their box is the polygons' extent, as COCO's is; a mask becomes
compressed RLE and its box is its pixels' tight box. Categories get ids 1..K: the names of
``categories`` in the order given (regions of other names are left out and counted), or else every
name found, sorted. Images keep their file, unless the file carries an EXIF orientation other
than "upright": labelme and the browser (VIA) annotate the image as shown, rotated, so it is
written rotated, as it was annotated (minimask reads pixels as stored).

Bad input is handled as :mod:`minimask.data.coco` handles it. A source that cannot be read at
all (no such folder, no annotation file, a VIA file that is not valid JSON or not VIA's) raises
:class:`ImportFormatError` naming it. Everything else is skipped, counted in a
:class:`~minimask.data.coco.DataProblems` and summarised, each message naming the file: an
annotation file that is not valid JSON, a missing or unreadable image, an image whose size is not
the one its annotation says, a polygon of fewer than 3 points, a mask of another size than its
image, an empty mask, a region with no category. If nothing usable is left, nothing is written.
"""

from __future__ import annotations

import base64
import binascii
import glob
import io
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from minimask.data.coco import DataProblems, read_json_file

__all__ = ["FORMATS", "ImportFormatError", "import_dataset"]

FORMATS = ("labelme", "via", "masks")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CURVE_POINTS = 32  # vertices of the polygon that stands for a circle or an ellipse
EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 (or absent) means the pixels are stored upright


class ImportFormatError(ValueError):
    """The source cannot be read at all (fatal): the message names it and says why."""


@dataclass
class Region:
    """One instance as the source gives it: polygons (flat ``[x1, y1, x2, y2, ...]``) or a mask
    file. ``where`` names it in messages."""

    category: str
    where: str
    polygons: list = field(default_factory=list)
    mask_file: str | None = None


@dataclass
class SourceImage:
    """One image of the source: its file (or embedded bytes), the size its annotation states
    (H, W), if any, and its regions."""

    file_name: str  # its name in OUT/<split>/
    where: str  # the annotation file that names it
    path: str | None = None
    data: bytes | None = None
    size: tuple[int, int] | None = None
    regions: list[Region] = field(default_factory=list)


# ---------------------------------------------------------------------------- the entry point
def import_dataset(source_format: str, src: str, out_dir: str, split: str = "train2017",
                   categories=None, attribute: str | None = None,
                   default_category: str | None = None, log=print) -> dict:  # fmt: skip
    """Convert ``src`` (a ``source_format`` of :data:`FORMATS`) into ``out_dir``'s COCO layout.

    Args:
        categories: names (a list, or one comma-separated string) to keep, numbered 1..K in this
            order; None keeps every name found, sorted.
        attribute, default_category: VIA only (module docstring).

    Returns:
        Counts: ``images``, ``annotations``, ``categories``, ``skipped`` (problems counted), and
        ``annotation_file`` (the JSON written).
    """
    if source_format not in FORMATS:
        raise ValueError(f"unknown format {source_format!r}; choose one of {', '.join(FORMATS)}")
    if not os.path.exists(src):
        raise ImportFormatError(f"no {source_format} source at {src}")
    problems = DataProblems(f"{source_format} import of {src}")
    if source_format == "labelme":
        images = read_labelme(src, problems)
    elif source_format == "via":
        images = read_via(src, problems, attribute, default_category)
    else:
        images = read_mask_folders(src, problems)
    names = _category_names(images, categories, problems)
    ids = {name: k + 1 for k, name in enumerate(names)}

    image_dir = os.path.join(out_dir, split)
    entries, annotations, pending = [], [], []
    for image in sorted(images, key=lambda im: im.file_name):
        opened = _open_image(image, problems)
        if opened is None:
            continue
        pil, rotated = opened
        height, width = pil.height, pil.width
        image_id = len(entries) + 1
        for region in image.regions:
            if region.category not in ids:
                continue
            segmentation = _segmentation(region, height, width, problems)
            if segmentation is not None:
                segm, bbox, area = segmentation
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": ids[region.category], "segmentation": segm,
                                    "bbox": bbox, "area": area, "iscrowd": 0})  # fmt: skip
        entries.append({"id": image_id, "file_name": image.file_name, "height": height,
                        "width": width})  # fmt: skip
        pending.append((image, pil if rotated else None))

    if not entries or not annotations:
        what = "no readable image" if not entries else "no usable region"
        why = problems.summary() if problems else f"{source_format} import of {src}"
        raise ValueError(f"{what}, nothing written: {why}")
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    for image, rotated in pending:
        _write_image(image, rotated, os.path.join(image_dir, image.file_name))
    coco = {
        "info": {"description": f"imported from {source_format} by minimask data import"},
        "licenses": [],
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": ids[n], "name": n, "supercategory": ""} for n in names],
    }
    path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    if problems:
        log(problems.summary())
    log(f"wrote {path} ({len(entries)} images, {len(annotations)} annotations, {len(names)} "
        f"categories: {', '.join(names)}) and {image_dir}/")  # fmt: skip
    return {"images": len(entries), "annotations": len(annotations), "categories": len(names),
            "skipped": sum(problems.counts.values()), "annotation_file": path}  # fmt: skip


def _category_names(images: list[SourceImage], wanted, problems: DataProblems) -> list[str]:
    """The category names in id order: ``wanted`` as given, or every name found, sorted."""
    found = {r.category for im in images for r in im.regions}
    if wanted is None:
        return sorted(found)
    if isinstance(wanted, str):
        wanted = [w.strip() for w in wanted.split(",") if w.strip()]
    names = list(dict.fromkeys(str(w) for w in wanted))
    if not names:
        raise ValueError("--categories is empty: give comma-separated category names")
    for im in images:
        for r in im.regions:
            if r.category not in names:
                problems.add("category not in --categories", f"{r.where}: {r.category!r}")
    return names


# ---------------------------------------------------------------------------- labelme
def read_labelme(src: str, problems: DataProblems) -> list[SourceImage]:
    """Every labelme file of the folder ``src`` (or the one file ``src``) as a SourceImage."""
    files = [src] if os.path.isfile(src) else sorted(glob.glob(os.path.join(src, "*.json")))
    if not files:
        raise ImportFormatError(f"no labelme .json file in {src}")
    images = []
    for path in files:
        data = _read_json(path, problems)
        if data is None:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            problems.add("not a labelme file", f"{path} has no 'shapes' list")
            continue
        image_path, embedded = data.get("imagePath"), data.get("imageData")
        if not isinstance(image_path, str) or not image_path:
            problems.add("not a labelme file", f"{path} has no 'imagePath'")
            continue
        image = SourceImage(os.path.basename(image_path.replace("\\", "/")), path)
        full = os.path.join(os.path.dirname(path), image_path)
        if os.path.isfile(full):
            image.path = full
        elif isinstance(embedded, str) and embedded:
            try:
                image.data = base64.b64decode(embedded, validate=True)
            except (binascii.Error, ValueError):
                problems.add("unreadable image", f"{path}: its imageData is not base64")
                continue
        else:
            problems.add("missing image file", f"missing image file {full} (named by {path})")
            continue
        height, width = data.get("imageHeight"), data.get("imageWidth")
        if isinstance(height, int) and isinstance(width, int):
            image.size = (height, width)
        image.regions = _labelme_regions(data["shapes"], path, problems)
        images.append(image)
    return images


def _labelme_regions(shapes: list, path: str, problems: DataProblems) -> list[Region]:
    regions, groups = [], {}
    for k, shape in enumerate(shapes):
        where = f"{path}, shape {k}"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            problems.add("bad shape", f"{where}: no label")
            continue
        kind = shape.get("shape_type") or "polygon"
        where = f"{where} ({shape['label']!r}, {kind})"
        points = shape.get("points")
        if not (isinstance(points, list) and all(_is_point(p) for p in points)):
            problems.add("bad shape", f"{where}: points are not [[x, y], ...]")
            continue
        if kind == "rectangle" and len(points) == 2:
            (x1, y1), (x2, y2) = points
            polygon = [x1, y1, x2, y1, x2, y2, x1, y2]
        elif kind == "circle" and len(points) == 2:
            (cx, cy), (px, py) = points
            r = math.hypot(px - cx, py - cy)
            polygon = ellipse_polygon(cx, cy, r, r)
        elif kind == "polygon":
            polygon = [float(v) for p in points for v in p]
        else:
            problems.add("shape is not a region", f"{where}: {len(points)} points")
            continue
        group = shape.get("group_id")
        if group is None:
            regions.append(Region(shape["label"], where, [polygon]))
        elif (shape["label"], group) in groups:  # one more part of an instance
            groups[(shape["label"], group)].polygons.append(polygon)
        else:
            groups[(shape["label"], group)] = Region(shape["label"], where, [polygon])
            regions.append(groups[(shape["label"], group)])
    return regions


def _is_point(p) -> bool:
    return isinstance(p, list) and len(p) == 2 and _finite_numbers(p)


# ---------------------------------------------------------------------------- VIA
def read_via(src: str, problems: DataProblems, attribute: str | None = None,
             default_category: str | None = None) -> list[SourceImage]:  # fmt: skip
    """The images of a VIA 1.x/2.x export (the file ``src``, or the one .json in ``src``)."""
    path = src
    if os.path.isdir(src):
        found = sorted(glob.glob(os.path.join(src, "*.json")))
        if len(found) != 1:
            listed = ", ".join(os.path.basename(f) for f in found) or "none"
            raise ImportFormatError(f"{src} should hold exactly one VIA .json file (found "
                                    f"{listed}); give the file itself")  # fmt: skip
        path = found[0]
    data = read_json_file(path, ImportFormatError)
    if isinstance(data, dict) and "_via_img_metadata" in data:  # a VIA 2.x project file
        data = data["_via_img_metadata"]
    if isinstance(data, dict) and {"project", "file", "metadata"} <= set(data):
        raise ImportFormatError(f"{path} is a VIA 3 project; export it from VIA 2 (or as COCO, "
                                "which needs no import)")  # fmt: skip
    if not isinstance(data, dict) or not all(
        isinstance(e, dict) and "filename" in e for e in data.values()
    ):
        raise ImportFormatError(f"{path} is not a VIA 1.x/2.x export: expected {{key: "
                                "{filename, size, regions}}}")  # fmt: skip
    folder = os.path.dirname(path)
    images = []
    for key, entry in data.items():
        where = f"{path}, {key}"
        name = os.path.basename(str(entry["filename"]).replace("\\", "/"))
        full = os.path.join(folder, str(entry["filename"]))
        if not os.path.isfile(full):
            problems.add("missing image file", f"missing image file {full} (named by {where})")
            continue
        raw = entry.get("regions") or []
        if isinstance(raw, dict):  # VIA 1.x: {"0": region, "1": region, ...}
            raw = [raw[k] for k in sorted(raw, key=lambda k: (len(str(k)), str(k)))]
        if not isinstance(raw, list):
            problems.add("bad region", f"{where}: regions is {type(raw).__name__}")
            raw = []
        regions = []
        for k, region in enumerate(raw):
            made = _via_region(region, f"{where}, region {k}", attribute, default_category,
                               problems)  # fmt: skip
            if made is not None:
                regions.append(made)
        images.append(SourceImage(name, where, path=full, regions=regions))
    return images


def _via_region(region, where, attribute, default_category, problems) -> Region | None:
    if not isinstance(region, dict) or not isinstance(region.get("shape_attributes"), dict):
        return problems.add("bad region", f"{where}: no shape_attributes")
    shape = region["shape_attributes"]
    kind = shape.get("name")
    category = _via_category(region.get("region_attributes") or {}, attribute, default_category)
    if category is None:
        hint = f"no attribute {attribute!r}" if attribute else "no single category attribute"
        return problems.add("region without a category",
                            f"{where}: {hint} in {region.get('region_attributes')} (name it "
                            "with --attribute, or give --default-category)")  # fmt: skip
    numbers = {k: v for k, v in shape.items() if k != "name"}
    if kind == "polygon":
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        if not (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys)
                and _finite_numbers(xs + ys)):  # fmt: skip
            return problems.add("bad region", f"{where}: all_points_x/y are not two equal lists")
        polygon = [float(v) for xy in zip(xs, ys) for v in xy]
    elif kind in ("rect", "circle", "ellipse") and _finite_numbers(numbers.values()):
        if kind == "rect":
            x, y, w, h = (float(shape.get(k, 0)) for k in ("x", "y", "width", "height"))
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        elif kind == "circle":
            polygon = ellipse_polygon(shape.get("cx", 0), shape.get("cy", 0), shape.get("r", 0),
                                      shape.get("r", 0))  # fmt: skip
        else:
            polygon = ellipse_polygon(shape.get("cx", 0), shape.get("cy", 0),
                                      shape.get("rx", 0), shape.get("ry", 0),
                                      shape.get("theta", 0))  # fmt: skip
    elif kind in ("rect", "circle", "ellipse"):
        return problems.add("bad region", f"{where}: {kind} with non-numbers {numbers}")
    else:
        return problems.add("shape is not a region", f"{where}: shape {kind!r}")
    return Region(category, f"{where} ({category!r}, {kind})", [polygon])


def _via_category(attributes, attribute, default_category) -> str | None:
    """The region's category name from its attributes (module docstring), or None."""
    if not isinstance(attributes, dict):
        attributes = {}
    if attribute is not None:
        value = attributes.get(attribute)
    else:
        given = [v for v in attributes.values() if v not in (None, "", {})]
        value = given[0] if len(given) == 1 else None
        if not given:
            return default_category
    if isinstance(value, dict):  # a checkbox attribute: {option: true, ...}
        ticked = [k for k, v in value.items() if v]
        value = ticked[0] if len(ticked) == 1 else None
    if isinstance(value, str) and value.strip():
        return value.strip()
    return default_category if attribute is not None and value in (None, "") else None


def ellipse_polygon(cx, cy, rx, ry, theta=0.0, points: int = CURVE_POINTS) -> list[float]:
    """A flat ``[x1, y1, ...]`` polygon of ``points`` vertices on the ellipse with centre
    (cx, cy), radii (rx, ry), turned by ``theta`` radians (a circle: rx = ry)."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(theta), math.sin(theta)
    xy = np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)  # (points, 2)
    return xy.reshape(-1).tolist()


# ---------------------------------------------------------------------------- mask folders
def read_mask_folders(src: str, problems: DataProblems) -> list[SourceImage]:
    """``SRC/images/<stem>.<ext>`` with ``SRC/masks/<stem>/<instance>_<category>.png``."""
    image_dir, mask_dir = os.path.join(src, "images"), os.path.join(src, "masks")
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise ImportFormatError(f"{src} has no {os.path.basename(folder)}/ folder (the "
                                    "masks format is SRC/images/<stem>.png and "
                                    "SRC/masks/<stem>/<instance>_<category>.png)")  # fmt: skip
    images, stems = [], set()
    for name in sorted(os.listdir(image_dir)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if stem in stems:
            problems.add("duplicate image stem", f"{os.path.join(image_dir, name)}: another "
                         f"image is also named {stem}.*")  # fmt: skip
            continue
        stems.add(stem)
        image = SourceImage(name, os.path.join(image_dir, name), path=os.path.join(image_dir, name))
        folder = os.path.join(mask_dir, stem)
        for mask_name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            mask_file = os.path.join(folder, mask_name)
            base, suffix = os.path.splitext(mask_name)
            if suffix.lower() != ".png":
                problems.add("not a PNG mask", f"{mask_file}: masks are <instance>_<category>.png")
            elif "_" not in base or not base.rsplit("_", 1)[1]:
                problems.add("mask name without a category",
                             f"{mask_file}: name masks <instance>_<category>.png")  # fmt: skip
            else:
                image.regions.append(Region(base.rsplit("_", 1)[1], mask_file, mask_file=mask_file))
        images.append(image)
    for stem in sorted(os.listdir(mask_dir)):
        if os.path.isdir(os.path.join(mask_dir, stem)) and stem not in stems:
            problems.add("masks without an image", f"{os.path.join(mask_dir, stem)}: no image "
                         f"{stem}.* in {image_dir}")  # fmt: skip
    if not images:
        raise ImportFormatError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return images


def read_mask(path: str):
    """The PNG at ``path`` as an (H, W) bool mask: True where any colour channel is not 0."""
    with Image.open(path) as pil:
        mode = pil.mode
        pixels = np.asarray(pil)
    if mode in ("RGB", "RGBA"):
        return pixels[..., :3].any(axis=-1)
    if mode == "LA":
        return pixels[..., 0] > 0
    return pixels > 0  # 1, L, P (palette index 0 is the background), I, I;16, F


# ---------------------------------------------------------------------------- shared steps
def _read_json(path: str, problems: DataProblems):
    """The JSON in ``path``, or None with the problem counted (the import goes on)."""
    try:
        return read_json_file(path, ImportFormatError)
    except ImportFormatError as e:
        return problems.add("unreadable annotation file", str(e))


def _open_image(image: SourceImage, problems: DataProblems):
    """``(PIL image, rotated)``: upright as annotated; None (counted) if it cannot be used."""
    what = image.path or f"the imageData of {image.where}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil = Image.open(image.path if image.data is None else io.BytesIO(image.data))
            pil.load()  # decode it all: a truncated file fails here, not in training
            orientation = pil.getexif().get(EXIF_ORIENTATION, 1)
            rotated = orientation not in (None, 1)
            if rotated:
                file_format, pil = pil.format, ImageOps.exif_transpose(pil)
                pil.format = file_format  # what to write it as
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # fmt: skip
        return problems.add("unreadable image", f"cannot read {what}: {e}")
    if image.size is not None and image.size != (pil.height, pil.width):
        return problems.add("image size differs from its annotation",
                            f"{what} is {pil.width}x{pil.height} pixels but {image.where} says "
                            f"{image.size[1]}x{image.size[0]}")  # fmt: skip
    return pil, rotated


def _segmentation(region: Region, height: int, width: int, problems: DataProblems):
    """``(segmentation, bbox [x, y, w, h], area)`` of a region, or None (counted)."""
    if region.mask_file is not None:
        try:
            mask = read_mask(region.mask_file)
        except (OSError, UnidentifiedImageError) as e:
            return problems.add("unreadable mask", f"cannot read {region.mask_file}: {e}")
        if mask.shape != (height, width):
            return problems.add("mask size differs from its image",
                                f"{region.mask_file} is {mask.shape[1]}x{mask.shape[0]} pixels but "
                                f"its image is {width}x{height}")  # fmt: skip
        if not mask.any():
            return problems.add("empty mask", f"{region.mask_file} has no pixel set")
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")  # JSON holds text
        return rle, bbox, float(mask_utils.area(rle))
    polygons = []
    for polygon in region.polygons:
        if len(polygon) < 6:
            problems.add("polygon of < 3 points",
                         f"{region.where}: a polygon of {len(polygon) // 2} points")  # fmt: skip
        elif not _finite_numbers(polygon):
            problems.add("bad region", f"{region.where}: a polygon holds non-finite numbers")
        else:
            polygons.append([round(float(v), 2) for v in polygon])
    if not polygons:
        return None
    xs = np.clip([v for p in polygons for v in p[0::2]], 0, width)
    ys = np.clip([v for p in polygons for v in p[1::2]], 0, height)
    x1, y1, x2, y2 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
    if x2 <= x1 or y2 <= y1:
        return problems.add("region outside the image or flat",
                            f"{region.where}: extent ({x1:g}, {y1:g}, {x2:g}, {y2:g}) in "
                            f"{width}x{height}")  # fmt: skip
    area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))))
    if area == 0:
        return problems.add("region outside the image or flat", f"{region.where}: covers no pixel")
    return polygons, [x1, y1, x2 - x1, y2 - y1], area


def _write_image(image: SourceImage, rotated, target: str) -> None:
    """Copy the image file to ``target`` (or write its embedded bytes, or its upright pixels)."""
    if rotated is not None:  # stored turned: write the pixels as annotated (upright)
        rotated.save(target, format=rotated.format, quality=95)
    elif image.data is not None:
        with open(target, "wb") as f:
            f.write(image.data)
    elif not (os.path.exists(target) and os.path.samefile(image.path, target)):
        shutil.copyfile(image.path, target)


def _finite_numbers(values) -> bool:
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
