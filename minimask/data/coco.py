"""COCO instance segmentation and person keypoints: the official JSON layout, via pycocotools.

Layout (as COCO publishes it)::

    ROOT/annotations/instances_<split>.json     images, annotations, categories
    ROOT/annotations/person_keypoints_<split>.json   the same, persons only, with keypoints
    ROOT/<split>/<file_name>                    the JPEG files, e.g. ROOT/val2017/000000000139.jpg

A sample is a dict in the model's format (see ``minimask/model/mask_rcnn.py``)::

    image      (3, H, W) float32 RGB in [0, 1]
    boxes      (G, 4) float32 (x1, y1, x2, y2) pixels: COCO's [x, y, w, h] -> [x, y, x+w, y+h]
    labels     (G,) int64 in 1..K (contiguous; 0 is background)
    masks      (G, H, W) uint8, decoded exactly as ``COCO.annToMask`` (polygons, RLE, crowd RLE)
    is_crowd   (G,) bool: crowd regions, which the matchers use as ignore regions only
    image_id   int (COCO's id);  file_name str;  orig_size (H, W) as stored in the JSON
    keypoints  (G, K, 3) float32 (x, y, v) pixels, from a keypoints file only: COCO's flat
               [x1, y1, v1, ...]; v = 0 not labelled (x = y = 0), 1 labelled but hidden, 2 visible

A keypoints file names its keypoints in its category (``keypoints``, ``skeleton``); the dataset
keeps them (:attr:`CocoDataset.keypoint_names`, :attr:`CocoDataset.skeleton`) and the left/right
swap a horizontal flip needs (:attr:`CocoDataset.flip_index`, from the names: ``left_eye`` <->
``right_eye``...).

Shape letters: H, W image size; G instances of one image; K categories chosen.

Coordinates are used as stored: the image's pixels as they lie in the file, with no EXIF rotation
(COCO's annotations were drawn on the stored pixels). An image whose decoded size disagrees with
its JSON entry is refused, never silently rescaled.

Bad data never stops a run half-way. The JSON itself must be sound (valid JSON with ``images``,
``annotations`` and ``categories``): otherwise :class:`CocoFormatError` names the file and the
key. A bad annotation (zero-area box, polygon of < 3 points, box outside the image, unknown
category, an RLE that does not cover the image, iscrowd not 0 or 1...) is dropped (or its box
clipped) and counted in :class:`DataProblems`, which warns once with a summary. A bad image
(missing, unreadable, truncated, too large, wrong size) raises :class:`BadImageError` naming the
file and the image id; the training and evaluation loops count it as a skip and report it at the
end.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from minimask.data.images import BadImageError, read_image
from minimask.data.transforms import random_horizontal_flip

__all__ = [
    "COCO_CATEGORIES",
    "BadImageError",
    "CocoBatches",
    "CocoDataset",
    "CocoFormatError",
    "DataProblems",
    "flip_index",
    "load_coco_json",
]

REQUIRED_KEYS = ("images", "annotations", "categories")

# COCO 2017's 80 categories by their ids (1..90, with gaps): the names in every official JSON.
# torchvision's 91-class models label a detection with its category id directly.
COCO_CATEGORIES = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}  # fmt: skip


class CocoFormatError(ValueError):
    """The annotation file cannot be used at all (fatal): the message names the file and why."""


class DataProblems:
    """Counted skips and fixes of one data source, with the first few messages of each kind.

    ``add`` returns None, so a cleaning function can ``return problems.add(...)`` to drop an item.
    """

    def __init__(self, source: str, examples: int = 3):
        self.source, self.max_examples = source, examples
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(message)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def summary(self) -> str:
        """One line per kind: the count and the first messages."""
        lines = [f"{self.source}: {sum(self.counts.values())} data problems"]
        for kind, n in self.counts.most_common():
            lines.append(f"  {n} x {kind}, e.g. " + "; ".join(self.examples[kind]))
        return "\n".join(lines)

    def warn(self) -> None:
        if self:
            warnings.warn(self.summary(), stacklevel=3)


def read_json_file(path: str, error=None):
    """The JSON in ``path``; a file that is not UTF-8 JSON raises ``error`` (a ValueError class,
    default :class:`CocoFormatError`) with a message naming the file and what is wrong."""
    error = error or CocoFormatError
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text: {e}") from e


def load_coco_json(path: str) -> dict:
    """Read a COCO annotation file; fatal problems raise :class:`CocoFormatError` naming it."""
    if not os.path.exists(path):
        raise CocoFormatError(f"no COCO annotation file at {path}")
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path} holds a JSON {type(data).__name__}, not a COCO object")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise CocoFormatError(
                f"{path} has no '{key}' key (a COCO instances file needs "
                f"{', '.join(REQUIRED_KEYS)}; it has {', '.join(sorted(data)) or 'none'})"
            )
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: '{key}' must be a list, not {type(data[key]).__name__}")
    return data


class CocoDataset:
    """A COCO split as model samples (module docstring), indexable by position.

    Args:
        annotation_file: ``instances_<split>.json``.
        image_dir: the folder holding the split's image files.
        categories: names or COCO ids to keep (default: all), mapped to labels 1..K in the
            order of their COCO ids; the annotations of other categories are left out.
        keep_empty: keep the images with no (non-crowd) annotation of the chosen categories.
            Training skips them (default); evaluation keeps them (their detections are false
            positives).

    Attributes:
        classes: ``["__background__", name_1, ..., name_K]`` for display.
        category_ids: (K,) the COCO category id of each label 1..K (``category_ids[label - 1]``).
        image_ids: the COCO ids of the images, in sample order.
        coco: a pycocotools ``COCO`` over the cleaned annotations (the evaluation ground truth).
        problems: the annotations dropped or fixed while loading (:class:`DataProblems`).
        keypoint_names: the K keypoints of the chosen categories (a keypoints file), else ().
        skeleton: their lines as 0-based pairs; flip_index: their left/right swap.
    """

    def __init__(self, annotation_file: str, image_dir: str, categories=None,
                 keep_empty: bool = False):  # fmt: skip
        self.annotation_file, self.image_dir = annotation_file, image_dir
        data = load_coco_json(annotation_file)
        self.problems = DataProblems(annotation_file)
        known = category_names(data["categories"], annotation_file)
        chosen = choose_categories(known, categories, annotation_file)
        self.category_ids = np.array(chosen, dtype=np.int64)
        self.cat_id_to_label = {c: k + 1 for k, c in enumerate(chosen)}
        self.classes = ["__background__"] + [known[c] for c in chosen]

        self.keypoint_names, self.skeleton = keypoint_categories(data["categories"], chosen,
                                                                 annotation_file)  # fmt: skip
        self.flip_index = flip_index(self.keypoint_names)
        images = _clean_images(data["images"], self.problems)
        anns_of = defaultdict(list)
        for ann in data["annotations"]:
            clean = _clean_annotation(ann, images, known, self.problems)
            if clean is not None and self.keypoint_names:
                clean = _clean_keypoints(clean, len(self.keypoint_names), self.problems)
            if clean is not None and clean["category_id"] in self.cat_id_to_label:
                anns_of[clean["image_id"]].append(clean)
        self.annotations_of = dict(anns_of)
        ids = sorted(images)
        if not keep_empty:
            ids = [i for i in ids if any(not a["iscrowd"] for a in anns_of.get(i, ()))]
        self.image_ids = ids
        self.images = images
        cleaned = {
            "info": data.get("info", {}),
            "images": [images[i] for i in sorted(images)],
            "annotations": [a for i in sorted(anns_of) for a in anns_of[i]],
            "categories": [{"id": c, "name": known[c]} for c in chosen],
        }
        if self.keypoint_names:  # as COCO's keypoints files: names and 1-based skeleton
            for c in cleaned["categories"]:
                c.update(keypoints=list(self.keypoint_names),
                         skeleton=[[a + 1, b + 1] for a, b in self.skeleton])  # fmt: skip
        self.coco = COCO()
        self.coco.dataset = cleaned
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.problems.warn()

    @classmethod
    def from_root(cls, root: str, split: str, keypoints: bool = False, **kwargs) -> CocoDataset:
        """The split ``split`` (e.g. ``val2017``) of a dataset in the official layout; with
        ``keypoints``, from ``person_keypoints_<split>.json``."""
        name = f"person_keypoints_{split}.json" if keypoints else f"instances_{split}.json"
        return cls(os.path.join(root, "annotations", name), os.path.join(root, split), **kwargs)

    @property
    def num_classes(self) -> int:
        """K + 1: the model's ``num_classes`` (background included)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.images[self.image_ids[index]]["file_name"])

    def __getitem__(self, index: int) -> dict:
        """Sample ``index`` at its stored size; raises :class:`BadImageError` for a bad image."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image_id = self.image_ids[index]
        entry = self.images[image_id]
        height, width = entry["height"], entry["width"]
        image = read_image(self.image_path(index), image_id)  # (3, H, W)
        if image.shape[1:] != (height, width):
            raise BadImageError(
                f"{self.image_path(index)} (image id {image_id}) is {image.shape[2]}x"
                f"{image.shape[1]} pixels but {self.annotation_file} says {width}x{height}"
            )
        return {"image": image, **self.target(image_id), "orig_size": (height, width)}

    def target(self, image_id: int) -> dict:
        """The ground truth of one image (no pixels read): boxes, labels, masks, is_crowd."""
        entry = self.images[image_id]
        anns = self.annotations_of.get(image_id, [])
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)  # xywh
        boxes[:, 2:] += boxes[:, :2]  # (G, 4) x1y1x2y2
        masks = np.zeros((len(anns), entry["height"], entry["width"]), dtype=np.uint8)
        if anns:  # COCO.annToMask, for all instances in one decode
            rles = [self.coco.annToRLE(a) for a in anns]
            with warnings.catch_warnings():  # pycocotools' NumPy 2 copy=False notice
                warnings.simplefilter("ignore", DeprecationWarning)
                masks[:] = mask_utils.decode(rles).transpose(2, 0, 1)  # (H, W, G) -> (G, H, W)
        target = {
            "boxes": boxes,
            "labels": np.array([self.cat_id_to_label[a["category_id"]] for a in anns], np.int64),
            "masks": masks,
            "is_crowd": np.array([bool(a["iscrowd"]) for a in anns], dtype=bool),
            "image_id": int(image_id),
            "file_name": entry["file_name"],
        }
        if self.keypoint_names:
            k = len(self.keypoint_names)
            flat = [a.get("keypoints") or [0] * (3 * k) for a in anns]  # crowds may have none
            target["keypoints"] = np.array(flat, dtype=np.float32).reshape(-1, k, 3)
        return target


# ---------------------------------------------------------------------------- keypoints
def keypoint_categories(entries, chosen, path) -> tuple[tuple[str, ...], tuple]:
    """The keypoint names and 0-based skeleton of the ``chosen`` categories, or ``((), ())``.

    COCO's keypoints files give them in the category (``person``: 17 names, 19 lines, 1-based).
    A model predicts one set of K keypoints for every class, so the chosen categories that have
    keypoints must all name the same ones.
    """
    found = {}
    for c in entries:
        if isinstance(c, dict) and int(c.get("id", -1)) in chosen and c.get("keypoints"):
            names = c["keypoints"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CocoFormatError(f"{path}: category {c['id']} keypoints must be names")
            pairs = c.get("skeleton") or []
            if not all(isinstance(p, list) and len(p) == 2 and _whole_numbers(p) and
                       all(1 <= v <= len(names) for v in p) for p in pairs):  # fmt: skip
                raise CocoFormatError(f"{path}: category {c['id']} skeleton {pairs!r:.80} is "
                                      f"not pairs of keypoint numbers 1..{len(names)}")  # fmt: skip
            found[int(c["id"])] = (tuple(names), tuple((a - 1, b - 1) for a, b in pairs))
    if not found:
        return (), ()
    if len({names for names, _ in found.values()}) > 1:
        raise CocoFormatError(f"{path}: the chosen categories {sorted(found)} name different "
                              "keypoints; choose categories with one set")  # fmt: skip
    return next(iter(found.values()))


def flip_index(names) -> tuple[int, ...]:
    """Where each keypoint goes in a horizontal flip: ``left_*`` and ``right_*`` trade places.

    A mirrored person's left wrist appears where a right wrist would be, so after flipping the
    image keypoint k must be relabelled ``flip_index[k]`` (COCO: eyes, ears, shoulders, elbows,
    wrists, hips, knees, ankles; the nose keeps its place).
    """
    position = {n: i for i, n in enumerate(names)}

    def mirrored(name: str) -> str:
        for side, other in (("left", "right"), ("right", "left")):
            if name.startswith(side):
                return other + name[len(side) :]
        return name

    return tuple(position.get(mirrored(n), i) for i, n in enumerate(names))


def _clean_keypoints(ann: dict, k: int, problems: DataProblems):
    """``ann`` if its ``keypoints`` are K (x, y, v) triples of numbers with v in {0, 1, 2} (or
    absent, as in crowd regions), else None (counted)."""
    kp = ann.get("keypoints")
    if kp is None:
        return ann
    where = f"annotation {ann.get('id', '?')} (image {ann['image_id']})"
    if not isinstance(kp, list) or len(kp) != 3 * k or not _numbers(kp):
        return problems.add("bad keypoints", f"{where}: keypoints {kp!r:.60} are not {k} triples")
    if any(v not in (0, 1, 2) for v in kp[2::3]):
        return problems.add("bad keypoints", f"{where}: a visibility is not 0, 1 or 2")
    return ann


# ---------------------------------------------------------------------------- cleaning
def category_names(entries, path) -> dict[int, str]:
    known = {}
    for c in entries:
        if not isinstance(c, dict) or "id" not in c:
            raise CocoFormatError(f"{path}: a category entry has no 'id': {c!r}")
        known[int(c["id"])] = str(c.get("name", c["id"]))
    if not known:
        raise CocoFormatError(f"{path}: 'categories' is empty")
    return known


def choose_categories(known: dict[int, str], wanted, path) -> list[int]:
    """COCO ids of the chosen categories (names or ids), sorted by id."""
    if wanted is None:
        return sorted(known)
    if isinstance(wanted, str):
        wanted = [w.strip() for w in wanted.split(",") if w.strip()]
    by_name = {name: cid for cid, name in known.items()}
    chosen = []
    for w in wanted:
        cid = by_name.get(w, int(w) if str(w).isdigit() else None)
        if cid not in known:
            names = ", ".join(sorted(by_name))
            raise ValueError(f"no category {w!r} in {path}; it has: {names}")
        chosen.append(cid)
    return sorted(set(chosen))


def _clean_images(entries, problems: DataProblems) -> dict[int, dict]:
    images = {}
    for entry in entries:
        keys = ("id", "file_name", "height", "width")
        missing = [k for k in keys if k not in entry] if isinstance(entry, dict) else list(keys)
        if missing:
            problems.add("image entry incomplete", f"image entry {entry!r:.80} lacks {missing}")
            continue
        try:
            image_id, height, width = int(entry["id"]), int(entry["height"]), int(entry["width"])
        except (TypeError, ValueError):
            problems.add("image entry incomplete", f"image entry {entry!r:.80}: bad id or size")
            continue
        if image_id in images:
            problems.add("duplicate image id", f"image id {image_id} appears twice")
        else:
            images[image_id] = {**entry, "id": image_id, "height": height, "width": width}
    return images


def _clean_annotation(ann: dict, images: dict, known: dict, problems: DataProblems):
    """A usable copy of ``ann`` (bbox clipped, bad polygons dropped), or None (counted)."""
    if not isinstance(ann, dict):
        return problems.add("annotation incomplete", f"annotation {ann!r:.60} is not an object")
    aid = ann.get("id", "?")
    missing = [k for k in ("image_id", "category_id", "bbox", "segmentation") if k not in ann]
    if missing:
        return problems.add("annotation incomplete", f"annotation {aid} lacks {missing}")
    image = images.get(ann["image_id"])
    if image is None:
        return problems.add("unknown image id", f"annotation {aid}: no image {ann['image_id']}")
    where = f"annotation {aid} (image {ann['image_id']}, {image['file_name']})"
    if ann["category_id"] not in known:
        return problems.add("unknown category id", f"{where}: category {ann['category_id']}")
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not _numbers(bbox):
        return problems.add("malformed box", f"{where}: bbox {bbox}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return problems.add("zero-area box", f"{where}: bbox {bbox}")
    width, height = image["width"], image["height"]
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return problems.add("box outside the image", f"{where}: bbox {bbox} in {width}x{height}")
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        problems.add("box clipped to the image", f"{where}: bbox {bbox} in {width}x{height}")
    crowd = ann.get("iscrowd", 0)  # COCO writes 0 or 1; JSON's false and true mean the same
    if crowd not in (0, 1):
        return problems.add("iscrowd not 0 or 1", f"{where}: iscrowd {crowd!r}")
    segm = _clean_segmentation(ann["segmentation"], height, width, where, problems)
    if segm is None:
        return None
    clean = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": segm}
    clean["iscrowd"] = int(crowd)
    clean.setdefault("area", (x2 - x1) * (y2 - y1))
    return clean


def _clean_segmentation(segm, height: int, width: int, where: str, problems: DataProblems):
    if isinstance(segm, dict):  # RLE, compressed (counts: str) or not (counts: list)
        problem = rle_problem(segm, height, width)
        return segm if problem is None else problems.add("bad RLE", f"{where}: {problem}")
    if not isinstance(segm, list):
        return problems.add("bad segmentation", f"{where}: segmentation is {type(segm).__name__}")
    if not segm:
        return problems.add("empty segmentation", f"{where}: segmentation []")
    polygons = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    if not all(_numbers(p) for p in polygons):
        return problems.add("bad segmentation", f"{where}: a polygon holds non-numbers")
    if len(polygons) < len(segm):
        dropped = len(segm) - len(polygons)
        problems.add("polygon of < 3 points", f"{where}: {dropped} of {len(segm)} polygons dropped")
    return polygons if polygons else None


def rle_problem(rle: dict, height: int, width: int) -> str | None:
    """Why ``rle`` cannot be the mask of a ``height`` × ``width`` image, or None if it can.

    An RLE lists the lengths of alternating runs of 0s and 1s down the columns (column-major),
    starting with 0s, so its runs must be whole numbers >= 0 that add up to exactly H·W. Too few
    would leave pixels that pycocotools never writes (they come out as whatever was in memory);
    too many make it fail with "Invalid RLE mask representation".
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or not _whole_numbers(size) or size != [height, width]:
        return f"RLE size {size!r} is not the image's [{height}, {width}]"
    if isinstance(counts, str):
        runs = rle_string_runs(counts)
        if runs is None:
            return f"RLE counts {counts!r:.40} is not COCO's compressed RLE string"
    elif isinstance(counts, list) and _whole_numbers(counts):
        runs = counts
    else:
        return f"RLE counts {counts!r:.40} is neither a string nor a list of whole numbers"
    if any(r < 0 for r in runs):
        return "RLE has a run of negative length"
    if sum(runs) != height * width:
        return f"RLE runs add up to {sum(runs)} pixels, not {height} x {width} = {height * width}"
    return None


def rle_string_runs(counts: str) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``), or None.

    Each run is a signed number written 5 bits per character, lowest bits first, as the
    characters ``chr(48 + c)`` for c in 0..63: bit 0x20 of c says another character follows,
    and bit 0x10 of the last one is the sign. From the fourth run on, the number stored is the
    difference from the run two before.
    """
    runs: list[int] = []
    value, digits = 0, 0
    for char in counts:
        c = ord(char) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << (5 * digits)
        digits += 1
        if c & 0x20:  # more characters of this number follow
            continue
        if c & 0x10:  # negative: extend the sign
            value |= -1 << (5 * digits)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, digits = 0, 0
    return None if digits else runs  # a number left unfinished is not an RLE


def _whole_numbers(values) -> bool:
    """Every value a JSON integer (not a bool, a float or a string)."""
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _numbers(values) -> bool:
    """Every value a finite int or float (JSON numbers; not bools, strings or null)."""
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


# ---------------------------------------------------------------------------- training stream
class CocoBatches:
    """``i -> (images, targets)`` for :func:`minimask.train.fit`, deterministic in ``i``.

    Batch ``i`` holds stream positions ``p = i·B .. i·B + B - 1``; position ``p`` is image
    ``perm_e[p mod N]`` of epoch ``e = p // N`` (``perm_e`` drawn from ``(seed, e)``),
    and flipped when a coin drawn from ``(seed, p)`` says so. A bad image is replaced by the
    next one of the same epoch, remembered, and counted in :attr:`problems`.

    While step ``i`` runs, one background thread already loads batch ``i + 1`` (Pillow and
    pycocotools decode outside the GIL), so on a GPU the loading hides behind the step.
    """

    def __init__(self, dataset: CocoDataset, batch_size: int, seed: int = 0, flip: bool = True):
        if len(dataset) == 0:
            raise ValueError(f"{dataset.annotation_file}: no image with annotations to train on")
        self.dataset, self.batch_size, self.seed, self.flip = dataset, batch_size, seed, flip
        self.problems = DataProblems(f"images of {dataset.image_dir}")
        self.bad: set[int] = set()
        self._perm: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))
        self._worker = ThreadPoolExecutor(max_workers=1)  # all loading runs on this one thread
        self._next: tuple[int, Future | None] = (-1, None)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
            self._perm = (epoch, order)
        return self._perm[1]

    def sample(self, position: int) -> dict:
        """The transformed sample at stream ``position`` (skipping bad images)."""
        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        perm = self.permutation(epoch)
        for step in range(n):
            index = int(perm[(offset + step) % n])
            if index in self.bad:
                continue
            try:
                sample = self.dataset[index]
            except BadImageError as e:
                self.bad.add(index)
                self.problems.add("bad image skipped", str(e))
                continue
            if self.flip:
                coin = np.random.default_rng((self.seed, 1, position))
                sample = random_horizontal_flip(sample, coin, flip_index=self.dataset.flip_index)
            return sample
        raise RuntimeError(
            f"no readable image in {self.dataset.image_dir}:\n{self.problems.summary()}"
        )

    def load(self, i: int):
        """Batch ``i`` as ``(images, targets)``, loaded on the calling thread."""
        samples = [self.sample(i * self.batch_size + k) for k in range(self.batch_size)]
        return [s["image"] for s in samples], samples

    def __call__(self, i: int):
        index, future = self._next
        if index != i or future is None:
            future = self._worker.submit(self.load, i)
        self._next = (i + 1, self._worker.submit(self.load, i + 1))  # overlaps step i
        return future.result()
