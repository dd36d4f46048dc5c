"""``python -m minimask.bench parity``: minimask against torchvision's Mask R-CNN, stage by stage.

Both models get the same weights (torchvision's ``maskrcnn_resnet50_fpn`` with a fixed seed, its
BatchNorm statistics randomised so that no norm layer is the identity, loaded into minimask's
``r50_fpn`` by :func:`~minimask.model.weights.load_weights`) and the same raw image. Each stage's
output is compared, and each stage after the RPN is also run on torchvision's input to that stage,
so that a difference shows where it starts instead of being carried along:

======================  =====================================================================
stage                   compared
======================  =====================================================================
batch                   the normalised, resized, padded image batch
P2 .. P6                every FPN level
objectness, deltas      the RPN head's outputs, anchors in the same order
proposals               the RPN's boxes after top-k, NMS and top-N: same boxes, same order
box logits, deltas      the box head on torchvision's proposals
postprocess             boxes, scores, labels from minimask's postprocess on torchvision's head
mask logits             the mask head on torchvision's detections (each one's class)
final                   end to end on minimask's own path: boxes, scores, labels and the
                        pasted masks (IoU after thresholding at 0.5)
======================  =====================================================================

"max abs" is ``max |minimask - torchvision|``; "max rel" is that divided by ``max |torchvision|``
(the stage's scale), so that it reads the same for logits of size 10 and boxes of size 1000.

The same helpers build the models and extract the stages for ``tests/test_parity.py``. torch and
torchvision are needed (the ``reference`` extra); they are imported only when a helper runs.
"""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass

import numpy as np

from minimask.model.config import get_config
from minimask.model.mask_rcnn import MaskRCNN
from minimask.model.weights import load_weights

SEED = 0  # torch.manual_seed for the reference model's initialisation
IMAGE_SIZE = (427, 640)  # a COCO-like size: resized to 800 x 1199, padded to 800 x 1216
SCORE_THRESH = 0.01  # both models' box_score_thresh (see parity_models)


def require_reference():
    """``(torch, torchvision)``, or exit with one line saying how to install them."""
    missing = []
    modules = []
    for name in ("torch", "torchvision"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            if error.name not in ("torch", "torchvision"):  # a broken install: say so loudly
                raise
            missing.append(name)
    if missing:
        raise SystemExit(
            f"the parity check needs {' and '.join(missing)}: pip install -e .[reference]"
        )
    return tuple(modules)


# ---------------------------------------------------------------------------- inputs
def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A (3, H, W) float32 RGB image in [0, 1]: smooth random waves plus a few flat ellipses.

    Smooth, so that resizing it is well conditioned; with edges, so that the features vary.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((3, height, width))
    for c in range(3):
        for _ in range(4):
            fy, fx = rng.uniform(-0.05, 0.05, size=2)
            image[c] += rng.uniform(0.05, 0.15) * np.sin(fy * y + fx * x + rng.uniform(0, 6.3))
    image += 0.5
    for mask in ellipse_masks(height, width, 4, seed + 1):
        image[:, mask] = rng.uniform(0.1, 0.9, size=(3, 1))
    return np.clip(image, 0, 1).astype(np.float32)


def ellipse_masks(height: int, width: int, count: int, seed: int) -> np.ndarray:
    """(count, H, W) bool masks of random ellipses, each at least 1/8 of the image across."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    masks = np.zeros((count, height, width), dtype=bool)
    for i in range(count):
        ry, rx = rng.uniform(height / 16, height / 4), rng.uniform(width / 16, width / 4)
        cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
        masks[i] = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    return masks


def mask_targets(height: int, width: int, count: int, seed: int) -> dict:
    """A training target of ``count`` ellipses: boxes (their pixel extents), labels, masks."""
    masks = ellipse_masks(height, width, count, seed)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    labels = np.random.default_rng(seed).integers(1, 91, size=count)
    return {
        "boxes": np.asarray(boxes, dtype=np.float32),
        "labels": labels.astype(np.int64),
        "masks": masks.astype(np.uint8),
    }


# ---------------------------------------------------------------------------- the two models
def randomize_norms(model, seed: int) -> None:
    """Give every (Frozen)BatchNorm2d of a torch model statistics and an affine map that are not
    the identity: mean ~ 0.1·N(0, 1), var ~ U[0.5, 2], weight ~ U[0.5, 1.5], bias ~ 0.1·N(0, 1).

    Fresh BatchNorm layers (mean 0, var 1, weight 1, bias 0) would pass a wrong eps, a swapped
    mean and variance, or a missing norm layer unnoticed.
    """
    torch, torchvision = require_reference()
    norms = (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms):
                c = m.weight.shape[0]
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))


def torchvision_maskrcnn(seed: int = SEED, frozen_bn: bool = False, **kwargs):
    """torchvision's Mask R-CNN R50-FPN, seeded, norms randomised, in eval mode.

    ``frozen_bn=False`` is ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` (with
    ``nn.BatchNorm2d``, so eval mode is what freezes it). ``frozen_bn=True`` assembles the same
    network with ``FrozenBatchNorm2d`` and every stage trainable, for a training step whose norm
    layers use their running statistics, as minimask's do. ``kwargs`` go to ``MaskRCNN``.
    """
    torch, torchvision = require_reference()
    from torchvision.models.detection import MaskRCNN as TorchMaskRCNN  # noqa: PLC0415
    from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: PLC0415
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: PLC0415

    torch.manual_seed(seed)
    if frozen_bn:
        body = torchvision.models.resnet50(norm_layer=torchvision.ops.FrozenBatchNorm2d)
        model = TorchMaskRCNN(_resnet_fpn_extractor(body, 5), num_classes=91, **kwargs)
    else:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    randomize_norms(model, seed + 1)
    return model.eval()


def torchvision_state(model) -> dict[str, np.ndarray]:
    """A torch model's state dict as NumPy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def minimask_from(state: dict, dtype=np.float32, **changes) -> MaskRCNN:
    """minimask's ``r50_fpn`` (with config ``changes``) holding torchvision ``state``, in eval
    mode and in ``dtype``."""
    model = MaskRCNN(get_config("r50_fpn", **changes))
    load_weights(model, state, log=lambda line: None)
    return model.to(dtype=dtype).eval()


def parity_models(seed: int = SEED, dtype=np.float32, **changes):
    """``(torchvision model, minimask model)`` with the same weights, both in eval mode.

    ``changes`` apply to both (torchvision's keyword names are derived from minimask's config
    names: ``min_size``, ``max_size`` and ``box_score_thresh``). The score threshold defaults to
    :data:`SCORE_THRESH`: below the usual 0.05, as random weights may score low, and above 0, so
    that the per-class NMS sees thousands of candidates rather than all R·(K-1) = 90,000.
    """
    torch, _ = require_reference()
    changes.setdefault("box_score_thresh", SCORE_THRESH)
    reference = torchvision_maskrcnn(seed, **changes)
    if dtype == np.float64:
        reference = reference.double()
    ours = minimask_from(torchvision_state(reference), dtype=dtype, **changes)
    return reference, ours


# ---------------------------------------------------------------------------- stages
def torchvision_stages(model, images) -> dict:
    """Every stage's output of a torchvision Mask R-CNN (eval mode) on raw ``images``, as NumPy.

    The stages are torchvision's own submodules called in ``GeneralizedRCNN.forward``'s order;
    the keys are those of :func:`minimask_stages`.
    """
    torch, _ = require_reference()
    from torchvision.models.detection.roi_heads import maskrcnn_inference  # noqa: PLC0415
    from torchvision.models.detection.rpn import concat_box_prediction_layers  # noqa: PLC0415

    def host(t):
        return t.detach().cpu().numpy()

    dtype = next(model.parameters()).dtype
    rpn, heads = model.rpn, model.roi_heads
    with torch.no_grad():
        tensors = [torch.from_numpy(np.asarray(im)).to(dtype) for im in images]
        original_sizes = [tuple(t.shape[-2:]) for t in tensors]
        batch, _ = model.transform(tensors)
        sizes = batch.image_sizes
        features = model.backbone(batch.tensors)  # {"0": P2, ..., "3": P5, "pool": P6}
        levels = list(features.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(batch, levels)
        per_level = [o[0].numel() for o in objectness]
        n = len(tensors)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # (N·T, 1), (N·T, 4)
        decoded = rpn.box_coder.decode(deltas, anchors).view(n, -1, 4)
        proposals, proposal_scores = rpn.filter_proposals(decoded, objectness, sizes, per_level)
        pooled = heads.box_roi_pool(features, proposals, sizes)
        class_logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
        boxes, scores, labels = heads.postprocess_detections(
            class_logits, box_deltas, proposals, sizes
        )
        pooled = heads.mask_roi_pool(features, boxes, sizes)
        mask_logits = heads.mask_predictor(heads.mask_head(pooled))  # (D, K, M, M)
        probs = maskrcnn_inference(mask_logits, labels)
        detections = [
            {"boxes": b, "scores": s, "labels": lab, "masks": p}
            for b, s, lab, p in zip(boxes, scores, labels, probs)
        ]
        final = model.transform.postprocess(detections, sizes, original_sizes)
        labels_all = torch.cat(labels)
        return {
            "batch": host(batch.tensors),
            "image_sizes": [tuple(s) for s in sizes],
            "features": [host(f) for f in levels],
            "objectness": host(objectness).reshape(n, -1),
            "rpn_deltas": host(deltas).reshape(n, -1, 4),
            "proposals": [host(p) for p in proposals],
            "proposal_scores": [host(s) for s in proposal_scores],  # sigmoid(objectness)
            "class_logits": host(class_logits),
            "box_deltas": host(box_deltas),
            "detections": [
                {"boxes": host(b), "scores": host(s), "labels": host(lab)}
                for b, s, lab in zip(boxes, scores, labels)
            ],
            "mask_logits": host(mask_logits[torch.arange(len(labels_all)), labels_all]),
            "final": [
                {
                    "boxes": host(d["boxes"]),
                    "scores": host(d["scores"]),
                    "labels": host(d["labels"]),
                    "masks": host(d["masks"][:, 0] >= 0.5).astype(np.uint8),  # (D, H, W)
                }
                for d in final
            ],
        }


def minimask_stages(model: MaskRCNN, images, reference: dict | None = None) -> dict:
    """Every stage's output of minimask's Mask R-CNN (eval mode) on raw ``images``.

    The keys match :func:`torchvision_stages`. The end-to-end path (``proposals`` ... ``final``)
    runs on minimask's own values. With ``reference`` (torchvision's stages), the box head, the
    postprocess and the mask head also run on torchvision's inputs to them, so each of those
    stages is compared on its own: ``class_logits``, ``box_deltas``, ``detections`` and
    ``mask_logits`` are then those isolated results.
    """
    from minimask.engine import no_grad  # noqa: PLC0415

    with no_grad():
        x, sizes, original_sizes, _ = model.preprocess(images)
        padded = tuple(x.shape[-2:])
        features = model.fpn(model.backbone(x))  # [P2, ..., P6]
        pooled_levels = features[:4]
        # The RPN's forward, opened up to keep the head's outputs (RPN.forward).
        rpn = model.rpn
        xp, dtype = features[0].xp, features[0].dtype
        per_level = rpn.anchor_generator.per_level(
            padded, [tuple(f.shape[-2:]) for f in features], xp=xp, dtype=dtype
        )
        anchors = xp.concatenate(per_level)
        level_of = xp.concatenate([xp.full(len(a), i) for i, a in enumerate(per_level)])
        logits, deltas = rpn.head(features)
        proposals = rpn._proposals(logits.data, deltas.data, anchors, level_of, sizes)
        # End to end, as MaskRCNN.forward: minimask's proposals onwards.
        heads = model.roi_heads
        detections, _ = heads(pooled_levels, proposals, sizes, padded)
        own = [{k: v.copy() for k, v in d.items()} for d in detections]  # before the masks
        model.mask_head.predict(pooled_levels, detections, padded)
        final = model.transform.postprocess(detections, sizes, original_sizes)
        out = {
            "batch": x.data,
            "image_sizes": [tuple(s) for s in sizes],
            "features": [f.data for f in features],
            "objectness": logits.data,
            "rpn_deltas": deltas.data,
            "proposals": proposals,
            "detections": own,
            "final": final,
        }
        if reference is not None:  # each head on torchvision's input to it
            their_proposals = [p.astype(dtype) for p in reference["proposals"]]
            box_features = heads.box_features(pooled_levels, their_proposals, padded)
            class_logits, box_deltas = heads.predictor(box_features)
            out["class_logits"], out["box_deltas"] = class_logits.data, box_deltas.data
            out["detections"] = heads.postprocess(
                reference["class_logits"].astype(dtype),
                reference["box_deltas"].astype(dtype),
                their_proposals,
                sizes,
            )
            their = [
                {"boxes": d["boxes"].astype(dtype), "labels": d["labels"]}
                for d in reference["detections"]
            ]
            model.mask_head.predict(pooled_levels, their, padded)
            out["mask_logits"] = xp.concatenate([d["mask_logits"] for d in their])
        return out


# ---------------------------------------------------------------------------- comparing
@dataclass
class Row:
    """One line of the stage table."""

    stage: str
    size: str  # the shape compared, or the counts (minimask / torchvision)
    max_abs: float | None = None
    max_rel: float | None = None
    note: str = ""


def differences(ours, theirs) -> tuple[float, float]:
    """``(max |ours - theirs|, that / max |theirs|)``, in float64."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: minimask {ours.shape}, torchvision {theirs.shape}")
    if ours.size == 0:
        return 0.0, 0.0
    diff = float(np.abs(ours - theirs).max())
    return diff, diff / max(float(np.abs(theirs).max()), np.finfo(np.float64).tiny)


def mask_ious(ours, theirs) -> np.ndarray:
    """(D,) IoU of each pair of binary (D, H, W) masks (1 where both are empty)."""
    a, b = np.asarray(ours, bool), np.asarray(theirs, bool)
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def match_boxes(ours, theirs) -> tuple[np.ndarray, np.ndarray]:
    """``(match, distance)``: for each of ``ours`` (P, 4), the index of the nearest box of
    ``theirs`` (Q, 4) and their largest coordinate difference."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if len(ours) == 0 or len(theirs) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=2)  # (P, Q)
    match = distance.argmin(axis=1)
    return match, distance[np.arange(len(ours)), match]


def _proposal_row(ours: list, theirs: list, scores: list) -> Row:
    """Proposals matched box to box: two whose scores differ by less than their rounding may
    come out in either order, which a plain difference would report as a jump of 100s of px."""
    counts = f"{'+'.join(str(len(o)) for o in ours)} / {'+'.join(str(len(t)) for t in theirs)}"
    if [len(o) for o in ours] != [len(t) for t in theirs]:
        return Row("proposals", counts, note="proposal counts differ")
    worst, scale, moved, gap, one_to_one = 0.0, 0.0, 0, 0.0, True
    for a, b, s in zip(ours, theirs, scores):
        match, distance = match_boxes(a, b)
        worst = max(worst, float(distance.max(initial=0)))
        scale = max(scale, float(np.abs(b).max(initial=0)))
        one_to_one &= len(set(match.tolist())) == len(match)
        out_of_place = np.flatnonzero(match != np.arange(len(match)))
        moved += len(out_of_place)
        gap = max(gap, float(np.abs(s[match[out_of_place]] - s[out_of_place]).max(initial=0)))
    if not one_to_one:
        note = "boxes do not match one to one"
    elif moved:
        note = f"same boxes; {moved} swapped in order, torchvision scores within {gap:.0e}"
    else:
        note = "same boxes, same order"
    return Row("proposals", counts, worst, worst / max(scale, np.finfo(np.float64).tiny), note)


def _shape(a) -> str:
    return "×".join(str(s) for s in np.shape(a))


def _array_row(stage: str, ours, theirs) -> Row:
    return Row(stage, _shape(theirs), *differences(ours, theirs))


def _listed_row(stage: str, ours: list, theirs: list, what: str) -> Row:
    """Per-image arrays: compared when every image has the same count, else counts only."""
    counts = f"{'+'.join(str(len(o)) for o in ours)} / {'+'.join(str(len(t)) for t in theirs)}"
    if [len(o) for o in ours] != [len(t) for t in theirs]:
        return Row(stage, counts, note=f"{what} counts differ")
    return Row(stage, counts, *differences(np.concatenate(ours), np.concatenate(theirs)))


def _label_row(stage: str, ours: list, theirs: list) -> Row:
    counts = f"{'+'.join(str(len(o)) for o in ours)} / {'+'.join(str(len(t)) for t in theirs)}"
    if [len(o) for o in ours] != [len(t) for t in theirs]:
        return Row(stage, counts, note="counts differ")
    same = sum(int((np.asarray(o) == np.asarray(t)).sum()) for o, t in zip(ours, theirs))
    return Row(stage, counts, note=f"{same} of {sum(len(t) for t in theirs)} equal")


def stage_rows(ours: dict, theirs: dict) -> list[Row]:
    """The stage table from :func:`minimask_stages` (with a reference) and
    :func:`torchvision_stages`."""
    rows = [_array_row("batch", ours["batch"], theirs["batch"])]
    for i, (a, b) in enumerate(zip(ours["features"], theirs["features"])):
        rows.append(_array_row(f"P{i + 2}", a, b))
    rows.append(_array_row("RPN objectness", ours["objectness"], theirs["objectness"]))
    rows.append(_array_row("RPN deltas", ours["rpn_deltas"], theirs["rpn_deltas"]))
    rows.append(_proposal_row(ours["proposals"], theirs["proposals"], theirs["proposal_scores"]))
    rows.append(
        _array_row("box head logits (their RoIs)", ours["class_logits"], theirs["class_logits"])
    )
    rows.append(
        _array_row("box head deltas (their RoIs)", ours["box_deltas"], theirs["box_deltas"])
    )
    for key in ("boxes", "scores"):
        rows.append(
            _listed_row(
                f"postprocess {key} (their logits)",
                [d[key] for d in ours["detections"]],
                [d[key] for d in theirs["detections"]],
                "detection",
            )
        )
    rows.append(
        _label_row(
            "postprocess labels (their logits)",
            [d["labels"] for d in ours["detections"]],
            [d["labels"] for d in theirs["detections"]],
        )
    )
    rows.append(_array_row("mask logits (their boxes)", ours["mask_logits"], theirs["mask_logits"]))
    for key in ("boxes", "scores"):
        rows.append(
            _listed_row(
                f"final {key}",
                [d[key] for d in ours["final"]],
                [d[key] for d in theirs["final"]],
                "detection",
            )
        )
    rows.append(
        _label_row(
            "final labels",
            [d["labels"] for d in ours["final"]],
            [d["labels"] for d in theirs["final"]],
        )
    )
    row = _label_row(
        "final masks (IoU at 0.5)",
        [d["masks"] for d in ours["final"]],
        [d["masks"] for d in theirs["final"]],
    )
    if not row.note.startswith("counts"):
        ious = np.concatenate(
            [mask_ious(a["masks"], b["masks"]) for a, b in zip(ours["final"], theirs["final"])]
        )
        row.note = f"min IoU {ious.min():.4f}" if ious.size else "no masks"
    rows.append(row)
    return rows


def _number(x: float | None) -> str:
    return "" if x is None else f"{x:.1e}"


def print_table(rows: list[Row], title: str) -> None:
    print(f"{title}\n")
    print("| stage | shape or counts (minimask / torchvision) | max abs | max rel | note |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        print(f"| {r.stage} | {r.size} | {_number(r.max_abs)} | {_number(r.max_rel)} | {r.note} |")
    print()


# ---------------------------------------------------------------------------- main
def main(repeat: int = 1, argv=None) -> None:
    """Build both models, run one image through both, print the stage table (``repeat`` has no
    effect: the comparison is deterministic)."""
    parser = argparse.ArgumentParser(prog="python -m minimask.bench parity", description=__doc__)
    parser.add_argument("--float64", action="store_true", help="run both models in float64")
    parser.add_argument("--min-size", type=int, default=800, help="shorter side after resizing")
    args = parser.parse_args(argv)
    torch, torchvision = require_reference()
    dtype = np.float64 if args.float64 else np.float32
    reference, ours = parity_models(dtype=dtype, min_size=args.min_size)
    image = smooth_image(*IMAGE_SIZE)
    start = time.perf_counter()
    theirs = torchvision_stages(reference, [image])
    middle = time.perf_counter()
    mine = minimask_stages(ours, [image], reference=theirs)
    end = time.perf_counter()
    name = np.dtype(dtype).name
    print_table(
        stage_rows(mine, theirs),
        f"Mask R-CNN R50-FPN, one {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} image resized to "
        f"{theirs['image_sizes'][0][0]}×{theirs['image_sizes'][0][1]}, {name}, "
        f"box_score_thresh {SCORE_THRESH}; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}",
    )
    print(
        f"time: torchvision {middle - start:.1f} s, minimask {end - middle:.1f} s (minimask's"
        " includes its heads run a second time, on torchvision's inputs)"
    )


if __name__ == "__main__":
    main()
