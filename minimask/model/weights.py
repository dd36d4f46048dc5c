"""Weights that travel to and from torchvision: file formats, the name table, loading, exporting.

minimask's ``r50_fpn`` preset has torchvision's ``maskrcnn_resnet50_fpn`` layers with the same
shapes; only the *names* differ (``backbone.stages.0.0.conv1.0.weight`` here is
``backbone.body.layer1.0.conv1.weight`` there). :data:`RULES` is the whole translation, one row
per layer: a student can read it as a table (docs/weights.md prints it). In a rule, ``{s}``,
``{b}``, ``{i}``... stand for a number copied from one name to the other; ``{s+1}`` is one more
(torchvision counts ``layer1..layer4`` from one, minimask's ``stages`` from zero) and ``{2*i}`` is
twice (torchvision's keypoint head interleaves its convs with ReLUs in one Sequential). A rule maps
a *layer*; the last part of a key (``weight``, ``bias``, ``running_mean``, ``running_var``) is kept.

Which weights can be read (``kind``, found by :func:`detect_kind`):

- ``"resnet"``: an ImageNet classification ResNet-50/101 (``resnet50().state_dict()``: ``conv1``,
  ``bn1``, ``layer1``.. ``layer4``, ``fc``). Its names are the detection backbone's without the
  ``backbone.body.`` prefix. ``fc`` (the 1000-class classifier) has no place in a detector and is
  dropped; load these with ``backbone_only=True``.
- ``"maskrcnn"``, ``"fasterrcnn"``, ``"keypointrcnn"``: torchvision's detection models. They share
  backbone, FPN, RPN and box head; each adds its task head (mask, none, keypoints). Older
  torchvision files name two layers differently (:data:`OLDER_TORCHVISION_RULES`); both read.
- ``"minimask"``: already minimask's names (a ``.npz`` checkpoint, or an exported file read back).

The C4 layout (``r50_c4``, ``r101_c4``) has no torchvision counterpart (torchvision builds no C4
Mask R-CNN), so it neither loads nor exports a whole torchvision detector. An ImageNet ResNet does
load into it (``--backbone-weights``): the trunk takes stem..``layer3``, and ``layer4`` goes to
res5, which is the C4 box head (``roi_heads.head.res5``, :data:`C4_RES5`).

Keypoint R-CNN weights load whole into a model with a keypoint head and no mask head (the
``r50_fpn_keypoints`` preset, ``num_keypoints=17, mask_head="none"``). Into a model without a
keypoint head they load the shared parts, keep the mask head's fresh initialisation, and report
the keypoint keys as not used.

BatchNorm: torchvision's ``BatchNorm2d`` and ``FrozenBatchNorm2d`` both store ``weight``, ``bias``,
``running_mean`` and ``running_var``; all four land in minimask's ``FrozenBatchNorm2d`` buffers.
``BatchNorm2d`` also counts batches (``num_batches_tracked``): dropped when reading, written as 0
when exporting so that both torchvision norms load the file with ``strict=True``.

Files (:func:`read_state_dict` tells them apart by their first bytes, not by their suffix): a
``.pth``/``.pt`` from ``torch.save`` (read by :mod:`minimask.model.torch_format`, without torch
and without running the pickle), ``.safetensors`` (a JSON header and raw arrays, nothing to
execute), and minimask's own ``.npz`` (a training checkpoint's ``model/*`` entries, or
``Module.save``).

The command line is one call each::

    minimask train|eval|predict --weights FILE  ->  load_weights(model, FILE)
    minimask train --backbone-weights FILE       ->  load_weights(model, FILE, backbone_only=True)
    minimask export --checkpoint C --to FILE     ->  export_weights(C, FILE)
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field

import numpy as np

from minimask.backend import to_host
from minimask.model.torch_format import (
    WeightsError,
    atomic_write,
    is_legacy_pth,
    load_pth,
    save_pth,
)
from minimask.nn import Module

__all__ = [
    "RULES",
    "OLDER_TORCHVISION_RULES",
    "CLASS_SPECIFIC",
    "LoadReport",
    "WeightsError",
    "detect_kind",
    "export_weights",
    "load_weights",
    "read_state_dict",
    "to_minimask",
    "to_torchvision",
]

# ---------------------------------------------------------------------------- the name table
# (minimask layer, torchvision layer): read left to right to export, right to left to load.
RULES: list[tuple[str, str]] = [
    # ResNet stem: the 7x7 conv and its norm
    ("backbone.stem.0", "backbone.body.conv1"),
    ("backbone.stem.1", "backbone.body.bn1"),
    # ResNet stages C2..C5 (torchvision's layer1..layer4), block b, conv j and its norm bn j
    ("backbone.stages.{s}.{b}.conv{j}.0", "backbone.body.layer{s+1}.{b}.conv{j}"),
    ("backbone.stages.{s}.{b}.conv{j}.1", "backbone.body.layer{s+1}.{b}.bn{j}"),
    ("backbone.stages.{s}.{b}.downsample.{d}", "backbone.body.layer{s+1}.{b}.downsample.{d}"),
    # FPN: 1x1 lateral and 3x3 output convs; both index C2..C5 as 0..3
    ("fpn.lateral.{i}", "backbone.fpn.inner_blocks.{i}.0"),
    ("fpn.smooth.{i}", "backbone.fpn.layer_blocks.{i}.0"),
    # RPN head
    ("rpn.head.conv", "rpn.head.conv.0.0"),
    ("rpn.head.cls_logits", "rpn.head.cls_logits"),
    ("rpn.head.bbox_pred", "rpn.head.bbox_pred"),
    # box head (Fast R-CNN): two FC layers, then class scores and class-specific box deltas
    ("roi_heads.head.fc6", "roi_heads.box_head.fc6"),
    ("roi_heads.head.fc7", "roi_heads.box_head.fc7"),
    ("roi_heads.predictor.cls_score", "roi_heads.box_predictor.cls_score"),
    ("roi_heads.predictor.bbox_pred", "roi_heads.box_predictor.bbox_pred"),
    # mask head: four 3x3 convs, the 2x transposed conv, the 1x1 conv to K mask logits
    ("mask_head.convs.{i}", "roi_heads.mask_head.{i}.0"),
    ("mask_head.upsample", "roi_heads.mask_predictor.conv5_mask"),
    ("mask_head.logits", "roi_heads.mask_predictor.mask_fcn_logits"),
    # keypoint head: eight 3x3 convs, then the 4x4 stride-2 transposed conv to K heatmaps
    ("keypoint_head.convs.{i}", "roi_heads.keypoint_head.{2*i}"),
    ("keypoint_head.logits", "roi_heads.keypoint_predictor.kps_score_lowres"),
]

# Names in files written by torchvision before 0.13 (its COCO weights among them); read only.
OLDER_TORCHVISION_RULES: list[tuple[str, str]] = [
    ("rpn.head.conv", "rpn.head.conv"),
    ("mask_head.convs.{i}", "roi_heads.mask_head.mask_fcn{i+1}"),
]

# Layers with one output per class (4 per class for box deltas): they cannot move between models
# with different class counts, and keep their fresh initialisation when the counts differ.
CLASS_SPECIFIC = (
    "roi_heads.predictor.cls_score",
    "roi_heads.predictor.bbox_pred",
    "mask_head.logits",
)
# (keypoint_head.logits has one output per keypoint type, not per class: a different K is a
# different task, and is refused as a shape mismatch.)

# The C4 layout's box head is the ResNet's C5 stage: torchvision's layer4 (minimask's trunk name
# backbone.stages.3) loads there, block for block.
C4_RES5 = ("backbone.stages.3.", "roi_heads.head.res5.")

# A detector is Faster R-CNN (backbone, fpn, rpn, roi_heads) plus optional task heads.
TASK_HEADS = ("mask_head", "keypoint_head")

KINDS = ("resnet", "fasterrcnn", "maskrcnn", "keypointrcnn", "minimask")
_DESCRIPTION = {
    "resnet": "an ImageNet classification ResNet",
    "fasterrcnn": "torchvision Faster R-CNN weights",
    "maskrcnn": "torchvision Mask R-CNN weights",
    "keypointrcnn": "torchvision Keypoint R-CNN weights",
    "minimask": "minimask weights",
}

# A placeholder: {s}, {s+1} or {2*i} (a * value + c).
_PLACEHOLDER = re.compile(r"\{(?:(\d+)\*)?([a-z])(?:\+(\d+))?\}")


@functools.cache
def _compile(pattern: str):
    """'layer{s+1}.{b}' -> (a regex matching 'layer3.5', [(variable, a, c), ...])."""
    parts, terms, start = [], [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts += [re.escape(pattern[start : m.start()]), r"(\d+)"]
        terms.append((m.group(2), int(m.group(1) or 1), int(m.group(3) or 0)))
        start = m.end()
    parts.append(re.escape(pattern[start:]))
    return re.compile("".join(parts)), terms


def _rename_layer(layer: str, source: str, target: str) -> str | None:
    """``layer`` rewritten from the ``source`` pattern to ``target``; None if it does not match."""
    regex, terms = _compile(source)
    m = regex.fullmatch(layer)
    if m is None:
        return None
    values = {}
    for (variable, a, c), text in zip(terms, m.groups()):
        if (int(text) - c) % a or int(text) < c:  # e.g. keypoint_head.3 is a ReLU: no rule
            return None
        values[variable] = (int(text) - c) // a

    def fill(p: re.Match) -> str:
        return str(int(p.group(1) or 1) * values[p.group(2)] + int(p.group(3) or 0))

    return _PLACEHOLDER.sub(fill, target)


def _rename(key: str, rules, to_torchvision: bool) -> str | None:
    """A key's name on the other side (layer renamed, last part kept); None if no rule knows it."""
    layer, _, leaf = key.rpartition(".")
    for minimask, torchvision in rules:
        source, target = (minimask, torchvision) if to_torchvision else (torchvision, minimask)
        renamed = _rename_layer(layer, source, target)
        if renamed is not None:
            return f"{renamed}.{leaf}"
    return None


# ---------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` from a ``.pth``/``.pt``, ``.safetensors`` or minimask ``.npz`` file.

    The format is told from the content. A ``.pth`` holding a checkpoint dict (torchvision's
    reference scripts save ``{"model": ..., "optimizer": ..., "args": ...}``) gives the state dict
    under ``model`` or ``state_dict``. Names are the file's own (see :func:`to_minimask`).

    Raises:
        FileNotFoundError: no file at ``path``.
        WeightsError: the file is empty, truncated, of none of these formats, or holds no state
            dict; the message is one line naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    with open(path, "rb") as f:
        head = f.read(32)
    size = os.path.getsize(path)
    if not head:
        raise WeightsError(f"{path}: the file is empty")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip: torch's .pth or NumPy's .npz
        if _zip_holds_npy(path):
            state = _read_npz(path)
        else:
            state = _state_dict_in(load_pth(path), path)
    elif is_legacy_pth(head):
        state = _state_dict_in(load_pth(path), path)
    elif len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        state = _read_safetensors(path)
    else:
        raise WeightsError(
            f"{path}: not a weights file (it begins {head[:8]!r}; expected a .pth zip or legacy"
            " pickle, a .safetensors header or a .npz)"
        )
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    return state


def _zip_holds_npy(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".npy") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise WeightsError(f"{path}: truncated or damaged zip archive ({e})") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """A training checkpoint's ``model/*`` entries (prefix removed), or every entry of a
    ``Module.save`` file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            if any(n.startswith("model/") for n in names):
                return {n[len("model/") :]: archive[n] for n in names if n.startswith("model/")}
            return {n: archive[n] for n in names}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: unreadable .npz ({e})") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Via ``safetensors.numpy``; bfloat16 entries (NumPy has no such type) are widened here."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - only needed here

    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        state = {}
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if header[name]["dtype"] != "BF16":
                    state[name] = f.get_tensor(name)
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] == "BF16":
                begin, end = entry["data_offsets"]
                with open(path, "rb") as f:
                    f.seek(8 + length + begin)
                    raw = np.frombuffer(f.read(end - begin), dtype="<u2")
                widened = (raw.astype(np.uint32) << 16).view(np.float32)
                state[name] = widened.reshape(entry["shape"])
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, struct.error) as e:
        raise WeightsError(f"{path}: truncated or damaged .safetensors ({e})") from None
    return state


def _state_dict_in(obj, path: str) -> dict[str, np.ndarray]:
    """The state dict in what ``torch.save`` saved: the object itself, or its ``model`` or
    ``state_dict`` entry (a training checkpoint)."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not all(isinstance(v, np.ndarray) for v in obj.values()):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        else:
            raise WeightsError(
                f"{path}: a dict of {sorted(map(str, obj))[:8]} that is not a state dict and has"
                " none under 'model' or 'state_dict'"
            )
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise WeightsError(f"{path}: entry {k!r} of the state dict is not a tensor")
    return dict(obj)


# ---------------------------------------------------------------------------- renaming
def detect_kind(state: dict) -> str:
    """Which weights these are, from their names: one of :data:`KINDS`."""
    keys = list(state)
    if any(k.startswith(("backbone.stem.", "backbone.stages.")) for k in keys):
        return "minimask"
    if any(k.startswith("roi_heads.keypoint_") for k in keys):
        return "keypointrcnn"
    if any(k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor.")) for k in keys):
        return "maskrcnn"
    if any(k.startswith("backbone.body.") for k in keys):
        return "fasterrcnn"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    raise WeightsError(f"cannot tell whose weights these are from their names ({keys[:4]}...)")


def _to_minimask(state: dict, kind: str | None) -> tuple[dict, str, list[str]]:
    """(the renamed state, its kind, the keys dropped on purpose)."""
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    kind = kind or detect_kind(state)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {KINDS} or None (detect)")
    if kind == "minimask":
        return dict(state), kind, []
    if kind == "resnet":  # the classifier's names are the detection backbone's, unprefixed
        state = {f"backbone.body.{k}": v for k, v in state.items()}
    renamed, dropped, origin = {}, [], {}
    for key, value in state.items():
        if key.endswith(".num_batches_tracked") or key.startswith("backbone.body.fc."):
            dropped.append(key.removeprefix("backbone.body.") if kind == "resnet" else key)
            continue
        new = _rename(key, RULES + OLDER_TORCHVISION_RULES, to_torchvision=False) or key
        if new in renamed:
            raise WeightsError(f"{origin[new]!r} and {key!r} both name {new!r}")
        renamed[new], origin[new] = value, key
    return renamed, kind, dropped


def to_minimask(state: dict, kind: str | None = None) -> dict:
    """torchvision's names -> minimask's (see :data:`RULES`); ``kind`` is detected when None.

    ``num_batches_tracked`` and a classifier's ``fc`` are dropped; a key that no rule knows keeps
    its name (a load then reports it as unexpected). minimask names pass through unchanged.
    """
    return _to_minimask(state, kind)[0]


def to_torchvision(state: dict) -> dict:
    """minimask's names -> torchvision's, with ``num_batches_tracked = 0`` for each norm layer
    (so ``load_state_dict(strict=True)`` works with BatchNorm2d and FrozenBatchNorm2d alike)."""
    out, unknown = {}, []
    for key, value in state.items():
        new = _rename(key, RULES, to_torchvision=True)
        if new is None:
            unknown.append(key)
            continue
        out[new] = value
        if key.endswith(".running_var"):
            out[new[: -len("running_var")] + "num_batches_tracked"] = np.array(0, dtype=np.int64)
    if any(k.startswith(C4_RES5[1]) for k in unknown):
        raise WeightsError(
            "a C4 layout model has no torchvision counterpart (torchvision builds no C4 Mask "
            "R-CNN): its weights stay in minimask's checkpoints"
        )
    if unknown:
        raise WeightsError(f"no torchvision name for {unknown}")
    return out


# ---------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What :func:`load_weights` did; ``notes`` are the lines it logged."""

    kind: str  # one of KINDS
    loaded: list[str] = field(default_factory=list)  # model keys now holding the file's values
    fresh: list[str] = field(default_factory=list)  # model keys that kept their initialisation
    unused: list[str] = field(default_factory=list)  # file keys not loaded (renamed if known)
    notes: list[str] = field(default_factory=list)


def load_weights(model: Module, source, *, backbone_only: bool = False, log=print) -> LoadReport:
    """Load a weights file (or a ``{name: array}`` dict) into ``model``, checking everything first.

    Args:
        model: a :class:`~minimask.model.mask_rcnn.MaskRCNN` (any :class:`Module` with its names).
        source: a path (see :func:`read_state_dict`) or a state dict with either side's names.
        backbone_only: load ``backbone.*`` only (an ImageNet ResNet, or another detector's
            backbone); the rest of the model keeps its initialisation.
        log: called with each note (``print`` by default; ``lambda line: None`` for silence).

    Rules: the shared Faster R-CNN part (backbone, FPN, RPN, box head) must be complete in the
    file. A task head the file lacks (the mask head, from Faster or Keypoint R-CNN weights) keeps
    its initialisation; a task head the model lacks (keypoints) is not used. When the class count
    differs, the :data:`CLASS_SPECIFIC` layers keep their initialisation. Each such case is noted.
    Arrays are cast to each parameter's dtype (float64/float16 -> float32...).

    Raises:
        WeightsError: missing or unexpected keys (all listed), shape mismatches (each key with
            both shapes), or values that are not real numbers (complex, strings; the key named).
            Nothing is written to the model unless every check passes.
    """
    if isinstance(source, (str, os.PathLike)):
        where, state = os.fspath(source), read_state_dict(source)
    else:  # a dict, perhaps another model's state on the GPU
        where, state = "the state dict", {k: to_host(v) for k, v in source.items()}
    renamed, kind, dropped = _to_minimask(state, None)
    own = model.state_dict()  # {name: array}: the shapes and dtypes to fill
    renamed = _place_res5(renamed, own)
    # num_batches_tracked counters are dropped silently: FrozenBatchNorm2d counts nothing.
    unused = [k for k in dropped if not k.endswith("num_batches_tracked")]
    notes, fresh = [], []
    if unused:
        notes.append(f"{', '.join(unused)} dropped: a classifier's last layer, not a detector's")

    if backbone_only:
        resnet = ("backbone.", C4_RES5[1])  # C4: the ResNet's C5 is the box head
        others = [k for k in renamed if not k.startswith(resnet)]
        unused += others
        renamed = {k: v for k, v in renamed.items() if k.startswith(resnet)}
        fresh += [k for k in own if not k.startswith(resnet)]
        if others:
            notes.append(f"backbone only: {len(others)} arrays of other parts not used")
    elif kind == "resnet":
        raise WeightsError(
            f"{where}: {_DESCRIPTION[kind]} holds only a backbone; load it with"
            " backbone_only=True (minimask train --backbone-weights)"
        )
    else:
        for head in TASK_HEADS:
            in_model = [k for k in own if k.startswith(head + ".")]
            in_file = [k for k in renamed if k.startswith(head + ".")]
            if in_model and not in_file:
                fresh += in_model
                notes.append(f"{head} keeps its fresh initialisation: the weights have none")
            if in_file and not in_model:
                unused += in_file
                renamed = {k: v for k, v in renamed.items() if not k.startswith(head + ".")}
                notes.append(f"{len(in_file)} {head} arrays not used: the model has no {head}")

    problems = []
    kept = set(fresh)
    missing = [k for k in own if k not in renamed and k not in kept]
    unexpected = [k for k in renamed if k not in own]
    if missing:
        problems.append(f"missing keys (in the model, not in the weights): {missing}")
    if unexpected:
        problems.append(f"unexpected keys (in the weights, not in the model): {unexpected}")

    # A different class count: the class-specific layers differ in their first axis only.
    other_classes = [
        layer
        for layer in CLASS_SPECIFIC
        if _differs_in_classes(own, renamed, f"{layer}.weight")
        or _differs_in_classes(own, renamed, f"{layer}.bias")
    ]
    if other_classes:
        notes.append(
            f"{', '.join(other_classes)} keep their fresh initialisation: the weights have"
            f" {_class_count(renamed)} classes (background included), the model"
            f" {_class_count(own)}"
        )
        keys = [k for k in own if k.rpartition(".")[0] in other_classes]
        fresh += keys
        unused += [k for k in keys if k in renamed]
        renamed = {k: v for k, v in renamed.items() if k not in keys}

    mismatched = [
        f"{k}: model {tuple(own[k].shape)}, weights {tuple(np.shape(v))}"
        for k, v in renamed.items()
        if k in own and tuple(np.shape(v)) != tuple(own[k].shape)
    ]
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    not_real = [
        f"{k} ({np.asarray(v).dtype})"
        for k, v in renamed.items()
        if k in own and np.asarray(v).dtype.kind not in "fiub"  # float, int, unsigned, bool
    ]
    if not_real:
        problems.append("values that are not real numbers: " + ", ".join(not_real))
    if problems:
        raise WeightsError(f"{where} does not fit {type(model).__name__}: " + "; ".join(problems))

    values = {k: np.asarray(v).astype(own[k].dtype, copy=False) for k, v in renamed.items()}
    model.load_state_dict(values, strict=False)
    report = LoadReport(kind, list(values), fresh, unused, notes)
    log(f"loaded {len(values)} of {len(own)} arrays from {where} ({_DESCRIPTION[kind]})")
    for note in notes:
        log(note)
    return report


def _place_res5(state: dict, own: dict) -> dict:
    """For a C4 model (res5 in its box head, no C5 in its trunk), move the weights' C5 there."""
    trunk, head = C4_RES5
    if any(k.startswith(trunk) for k in own) or not any(k.startswith(head) for k in own):
        return state  # an FPN model: C5 stays in the backbone
    return {head + k[len(trunk) :] if k.startswith(trunk) else k: v for k, v in state.items()}


def _differs_in_classes(own: dict, state: dict, key: str) -> bool:
    """Both have ``key``, with shapes that differ in the first (class) axis only."""
    if key not in own or key not in state:
        return False
    theirs, ours = tuple(np.shape(state[key])), tuple(own[key].shape)
    return theirs != ours and theirs[1:] == ours[1:]


def _class_count(state: dict):
    """K, the classes including background, from the box classifier (or the mask logits)."""
    for key in ("roi_heads.predictor.cls_score.weight", "mask_head.logits.weight"):
        if key in state:
            return np.shape(state[key])[0]
    return "?"


# ---------------------------------------------------------------------------- exporting
EXPORT_SUFFIXES = (".pth", ".pt", ".safetensors")


def export_weights(model_or_state, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Write weights under torchvision's names, as ``.pth``/``.pt`` or ``.safetensors`` by suffix.

    ``model_or_state`` is a :class:`Module`, a state dict (either side's names), or the path of
    any file :func:`read_state_dict` reads (a minimask checkpoint, say). The ``.pth`` is written
    by :func:`~minimask.model.torch_format.save_pth` (no torch needed); both formats are written
    atomically. The result loads with ``strict=True`` into
    ``torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
    num_classes=K)`` with the same K (a keypoint model's into ``keypointrcnn_resnet50_fpn``).
    Returns the ``{torchvision name: array}`` written.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in EXPORT_SUFFIXES:
        raise WeightsError(f"{path}: unknown suffix {suffix!r}; use one of {EXPORT_SUFFIXES}")
    if isinstance(model_or_state, Module):
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, (str, os.PathLike)):
        state = to_minimask(read_state_dict(model_or_state))
    else:
        state = to_minimask(model_or_state)
    state = {k: np.ascontiguousarray(to_host(v)) for k, v in state.items()}
    out = to_torchvision(state)
    if suffix == ".safetensors":
        from safetensors.numpy import save  # noqa: PLC0415 - only needed here

        data = save(out, metadata={"format": "pt"})  # "pt": the convention of torch's loaders
        atomic_write(path, lambda f: f.write(data))
    else:
        save_pth(path, out)
    return out
