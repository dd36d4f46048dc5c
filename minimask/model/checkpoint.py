"""Building a model, and reading and writing minimask's own checkpoints: one module for both.

A **checkpoint** is one ``.npz`` written atomically by :func:`save_checkpoint`:

- ``model/<name>``: every parameter and buffer of the model (minimask's names);
- ``optim/<index>/<name>``: the optimizer's state (momentum buffers, AdamW moments);
- ``meta``: a JSON string with the iteration reached, the optimizer's groups, the model's whole
  config (``model_config``), the class names and their dataset ids (``classes``,
  ``category_ids``), and the facts of the run (preset, dataset, batch size, seed...).

So a checkpoint alone rebuilds its model (:func:`model_from_checkpoint`). Weights from elsewhere
(torchvision's ``.pth``, ``.safetensors``) come in through :mod:`minimask.model.weights`;
:func:`load_model` takes either kind for ``eval`` and ``predict``.

:func:`build_model` is the one place that decides which backbone stages train: every stage when
the model starts from random weights, and only the last ``config.trainable_stages`` when
pre-trained weights were loaded (torchvision's rule; freezing random weights would be useless).
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from minimask.backend import to_host
from minimask.model.config import MaskRCNNConfig, get_config
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import Module, init, save_npz


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model: Module, optimizer, iteration: int, meta: dict) -> None:
    """Model, optimizer and progress in one ``.npz``, written atomically."""
    arrays = {f"model/{k}": to_host(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        sd = optimizer.state_dict()
        for index, entries in sd["state"].items():
            for k, v in entries.items():
                arrays[f"optim/{index}/{k}"] = np.asarray(to_host(v) if hasattr(v, "shape") else v)
        meta = {"param_groups": sd["param_groups"], **meta}
    arrays["meta"] = np.array(json.dumps({"iteration": iteration, **meta}))
    save_npz(path, arrays)


def read_meta(path: str) -> dict:
    """The ``meta`` dict of a checkpoint, without loading its arrays."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # an .npz is a zip archive
        raise ValueError(f"{path} is not a minimask checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "meta" not in archive.files:
                raise ValueError(f"{path} is not a minimask training checkpoint (no 'meta' entry)")
            return json.loads(str(archive["meta"]))
    except (OSError, EOFError, ValueError) as e:
        if "minimask" in str(e):
            raise
        raise ValueError(f"{path} is not a readable minimask checkpoint ({e})") from e


def load_checkpoint(path: str, model: Module, optimizer=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns its meta dict (with ``iteration``)."""
    meta = read_meta(path)
    with np.load(path, allow_pickle=False) as archive:
        files = archive.files
        model.load_state_dict({k[6:]: archive[k] for k in files if k.startswith("model/")})
        if optimizer is not None:
            state: dict[int, dict] = {}
            for k in files:
                if k.startswith("optim/"):
                    _, index, name = k.split("/", 2)
                    state.setdefault(int(index), {})[name] = archive[k]
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def config_from_meta(meta: dict, path: str = "the checkpoint") -> MaskRCNNConfig:
    """The :class:`MaskRCNNConfig` stored in a checkpoint's meta (lists back to tuples)."""
    if "model_config" not in meta:
        raise ValueError(f"{path} holds no model_config: not a Mask R-CNN checkpoint")
    known = set(MaskRCNNConfig.__dataclass_fields__)
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config fields {unknown} (a newer minimask's?)")
    return MaskRCNNConfig(**stored)


def model_from_checkpoint(path: str) -> tuple[MaskRCNN, dict]:
    """Rebuild the model a checkpoint was trained as, load its weights, and return it in eval
    mode with the checkpoint's meta."""
    meta = read_meta(path)
    model = MaskRCNN(config_from_meta(meta, path))
    load_checkpoint(path, model)
    model.eval()
    return model, meta


# ---------------------------------------------------------------------------- building
def build_model(config: MaskRCNNConfig | str, seed: int = 0, weights: str | None = None,
                backbone_weights: str | None = None, log=print, **changes) -> MaskRCNN:  # fmt: skip
    """A model of ``config`` with weights drawn from ``seed``, then, if given, loaded weights.

    Args:
        config: a :class:`MaskRCNNConfig`, or a preset's name (``"tiny"``) with ``changes``
            to its fields (``num_classes=4``).
        weights: a whole detector's weights (torchvision's or minimask's); class-specific last
            layers start fresh when the class count differs.
        backbone_weights: an ImageNet classification ResNet, for the backbone only.

    With loaded weights the backbone keeps only its last ``config.trainable_stages`` stages
    trainable; from scratch every stage trains.
    """
    from minimask.model.weights import load_weights  # noqa: PLC0415 - file formats on demand

    if weights and backbone_weights:
        raise ValueError("give --weights (a whole detector) or --backbone-weights, not both")
    if isinstance(config, str):
        config = get_config(config, **changes)
    init.manual_seed(seed)
    model = MaskRCNN(config)
    if weights or backbone_weights:
        load_weights(model, weights or backbone_weights, backbone_only=bool(backbone_weights),
                     log=log)  # fmt: skip
        model.freeze_backbone(config.trainable_stages)
    return model


def load_model(checkpoint: str | None = None, weights: str | None = None, preset: str = "r50_fpn",
               log=print) -> tuple[MaskRCNN, dict]:  # fmt: skip
    """A model to evaluate or predict with, from a minimask checkpoint or a weights file.

    A weights file carries no config: the model is ``preset`` (torchvision's 800/1333 sizes for
    ``r50_fpn``) with the class count read from the file, and Keypoint R-CNN's keypoint head
    (and no mask head) when the file has one. torchvision's 91-class COCO weights
    label each detection with its COCO category id, so their ``category_ids`` are 1..90.

    Returns the model (eval mode) and a meta dict with ``classes`` and ``category_ids``.
    """
    from minimask.data.coco import COCO_CATEGORIES  # noqa: PLC0415
    from minimask.model.weights import load_weights, read_state_dict, to_minimask  # noqa: PLC0415

    if bool(checkpoint) == bool(weights):
        raise ValueError("give either --checkpoint (minimask's) or --weights (any Mask R-CNN)")
    if checkpoint:
        return model_from_checkpoint(checkpoint)
    state = to_minimask(read_state_dict(weights))
    key = "roi_heads.predictor.cls_score.weight"
    if key not in state:
        raise ValueError(f"{weights} holds no box predictor ({key}): not a whole detector")
    num_classes = int(np.shape(state[key])[0])
    changes = {"num_classes": num_classes}
    keypoints = state.get("keypoint_head.logits.weight")  # (C, K, 4, 4): a Keypoint R-CNN's
    if keypoints is not None:
        has_masks = "mask_head.logits.weight" in state
        changes.update(num_keypoints=int(np.shape(keypoints)[1]),
                       mask_head="fcn" if has_masks else "none")  # fmt: skip
    model = MaskRCNN(get_config(preset, **changes))
    load_weights(model, state, log=log)
    model.eval()
    if num_classes == 91:  # torchvision's COCO models: label k is COCO category id k
        classes = ["__background__"] + [COCO_CATEGORIES.get(k, "N/A") for k in range(1, 91)]
    else:
        classes = ["__background__"] + [str(k) for k in range(1, num_classes)]
    meta = {"classes": classes, "category_ids": list(range(1, num_classes)), "weights": weights}
    return model, meta
