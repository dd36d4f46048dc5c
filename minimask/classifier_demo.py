"""The foundation demo: train a tiny CNN to tell four shapes apart, with nothing but minimask.

Every piece Mask R-CNN is built from is used here at small scale: conv, GroupNorm, ReLU, max
pooling and a linear layer (``minimask.nn``), softmax cross-entropy, backprop through the engine,
SGD with momentum and weight decay, a linear warm-up then step-decay schedule, and gradient
clipping. Images are drawn on the fly from a seeded generator, so no download is needed::

    python -m minimask demo --steps 300 --out runs/demo --seed 0

It prints the loss as it falls and a held-out accuracy table, and writes ``loss_curve.png``,
``metrics.json`` and the trained weights ``model.npz`` to ``--out``.

Shape letters: N images, C channels, S = 32 pixels a side, K = 4 classes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from minimask import nn
from minimask.backend import get_xp, to_host
from minimask.engine import Tensor, no_grad
from minimask.ops.losses import cross_entropy

CLASSES = ("square", "disk", "ring", "cross")


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo, with the defaults used by ``python -m minimask demo``."""

    steps: int = 500  # SGD iterations (10-20 s on 2 CPU cores)
    batch_size: int = 32  # images per iteration
    image_size: int = 32  # S: images are S x S, 3 channels
    width: int = 8  # channels of the first conv; the next two have twice as many
    lr: float = 0.02  # the peak learning rate
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 30  # linear warm-up from warmup_factor * lr to lr
    warmup_factor: float = 0.1
    clip_norm: float = 5.0  # clip the global gradient norm to this
    test_images: int = 400  # held-out images, drawn from a separate seed
    seed: int = 0
    device: str = "cpu"


# ---------------------------------------------------------------------------- the data
def draw_shape(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (S, S) mask of one shape of class ``label``, at a random place and scale."""
    r = rng.uniform(0.18, 0.32) * size  # the shape's half-width
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    dy, dx = yy - cy, xx - cx
    if CLASSES[label] == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if CLASSES[label] == "disk":
        return dy**2 + dx**2 <= r**2
    if CLASSES[label] == "ring":
        dist = np.sqrt(dy**2 + dx**2)
        return (dist <= r) & (dist >= 0.55 * r)
    bar = 0.3 * r  # "cross": a plus sign of two bars
    return ((np.abs(dy) <= bar) & (np.abs(dx) <= r)) | ((np.abs(dx) <= bar) & (np.abs(dy) <= r))


def make_images(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images and labels: (N, 3, S, S) float32 around 0, and (N,) int64.

    Each image is one shape, light on dark or dark on light, in random colours, plus noise, so that
    only the outline tells the classes apart.
    """
    labels = rng.integers(0, len(CLASSES), size=n)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        mask = draw_shape(int(label), size, rng)
        background = rng.uniform(0.0, 0.4, size=3)  # a dark colour...
        colour = rng.uniform(0.6, 1.0, size=3)  # ...and a light one, both of random hue
        if rng.random() < 0.5:  # a light shape on dark, or a dark shape on light
            background, colour = colour, background
        image = np.where(mask, colour[:, None, None], background[:, None, None])  # (3, S, S)
        images[i] = image + rng.normal(0, 0.1, size=image.shape) - 0.5
    return images, labels


# ---------------------------------------------------------------------------- the model
class TinyConvNet(nn.Module):
    """Three conv-GroupNorm-ReLU-maxpool blocks and a linear classifier: (N, 3, S, S) -> (N, K)."""

    def __init__(self, num_classes: int = len(CLASSES), image_size: int = 32, width: int = 8):
        super().__init__()
        blocks = []
        channels = 3
        for out in (width, 2 * width, 2 * width):
            blocks += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.GroupNorm(4, out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*blocks)
        side = image_size // 8  # three 2x2 poolings
        self.classifier = nn.Linear(channels * side * side, num_classes)
        for m in self.modules():  # ReLU nets train faster from He init (torch's default is milder)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # small logits at the start: the first loss is ln K, the loss of a uniform guess
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: Tensor) -> Tensor:
        features = self.features(images)  # (N, 2 * width, S / 8, S / 8)
        return self.classifier(nn.flatten(features))  # (N, K) logits


# ---------------------------------------------------------------------------- training
def evaluate(model: TinyConvNet, images, batch_size: int = 100) -> np.ndarray:
    """Predicted labels (N,) for ``images`` (N, 3, S, S), in eval mode and without a graph."""
    model.eval()
    predictions = []
    with no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(Tensor(images[start : start + batch_size]))  # (B, K)
            predictions.append(to_host(logits.data).argmax(axis=1))
    model.train()
    return np.concatenate(predictions)


def train(config: DemoConfig, progress: bool = True, log=print) -> tuple[TinyConvNet, dict]:
    """Train :class:`TinyConvNet` on fresh random images; return it and its metrics.

    Args:
        config: the settings (see :class:`DemoConfig`).
        progress: show a tqdm bar with the running loss.
        log: where the loss table goes (``print``, or a no-op).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415 - only the demo needs it

    xp = get_xp(config.device)
    train_rng = np.random.default_rng(config.seed)
    test_rng = np.random.default_rng([config.seed, 1])  # an independent stream: held-out data
    nn.init.manual_seed(config.seed)
    model = TinyConvNet(image_size=config.image_size, width=config.width).to(config.device)
    optimizer = nn.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    schedule = nn.WarmupMultiStepSchedule(
        base_lr=config.lr,
        milestones=(int(0.7 * config.steps), int(0.9 * config.steps)),
        warmup_iters=min(config.warmup_iters, config.steps // 2),
        warmup_factor=config.warmup_factor,
    )

    losses: list[float] = []
    log_every = max(1, config.steps // 10)
    log(f"training TinyConvNet ({model.num_parameters():,} parameters) on {', '.join(CLASSES)}")
    log(f"{'step':>6} {'loss':>8} {'lr':>9}")
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="demo", disable=not progress, leave=False)
    write = bar.write if progress else log  # table rows print above the bar, not through it
    running = None
    for step in bar:
        images, labels = make_images(config.batch_size, config.image_size, train_rng)
        optimizer.set_lr(schedule(step))
        logits = model(Tensor(xp.asarray(images)))  # (N, K)
        loss = cross_entropy(logits, xp.asarray(labels))
        optimizer.zero_grad()
        loss.backward()
        nn.clip_grad_norm(model.parameters(), config.clip_norm)
        optimizer.step()

        losses.append(loss.item())
        running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % log_every == 0 or step == 0:
            window = losses[-log_every:] if step else losses
            write(f"{step + 1:>6} {np.mean(window):>8.4f} {schedule(step):>9.5f}")
    bar.close()
    seconds = time.perf_counter() - start

    test_images, test_labels = make_images(config.test_images, config.image_size, test_rng)
    predicted = evaluate(model, xp.asarray(test_images))
    per_class = {
        name: float(np.mean(predicted[test_labels == k] == k)) if np.any(test_labels == k) else None
        for k, name in enumerate(CLASSES)
    }
    first = float(np.mean(losses[: max(1, len(losses) // 10)]))
    last = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    metrics = {
        "config": asdict(config),
        "num_parameters": model.num_parameters(),
        "initial_loss": first,  # mean of the first tenth of the steps
        "final_loss": last,  # mean of the last tenth
        "accuracy": float(np.mean(predicted == test_labels)),
        "chance": 1 / len(CLASSES),
        "per_class_accuracy": per_class,
        "train_seconds": seconds,
        "losses": losses,
    }
    return model, metrics


# ---------------------------------------------------------------------------- reporting
def plot_losses(losses: list[float], path: str) -> None:
    """Write the training loss (raw and smoothed) to ``path`` as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - no GUI needed
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="loss")
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window}")
    ax.axhline(np.log(len(CLASSES)), color="gray", ls="--", lw=1, label="chance (ln 4)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("TinyConvNet on synthetic shapes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summary_table(metrics: dict) -> str:
    """The held-out accuracy per class and overall, as a small text table."""
    rows = [f"{'class':<10} {'accuracy':>9}", "-" * 20]
    for name, acc in metrics["per_class_accuracy"].items():
        rows.append(f"{name:<10} {'-' if acc is None else f'{acc:.1%}':>9}")
    rows.append("-" * 20)
    rows.append(f"{'all':<10} {metrics['accuracy']:>9.1%}")
    rows.append(f"{'chance':<10} {metrics['chance']:>9.1%}")
    return "\n".join(rows)


def run(config: DemoConfig, out: str = "runs/demo", progress: bool = True, log=print) -> dict:
    """Train, then write ``loss_curve.png``, ``metrics.json`` and ``model.npz`` to ``out``."""
    model, metrics = train(config, progress=progress, log=log)
    os.makedirs(out, exist_ok=True)
    plot_losses(metrics["losses"], os.path.join(out, "loss_curve.png"))
    model.save(os.path.join(out, "model.npz"))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    log("")
    tenth = max(1, config.steps // 10)
    first, last, seconds = metrics["initial_loss"], metrics["final_loss"], metrics["train_seconds"]
    log(f"loss {first:.3f} -> {last:.3f} (mean of first/last {tenth} steps; {seconds:.0f} s)")
    log(f"accuracy on {config.test_images} held-out images:")
    log(summary_table(metrics))
    log(f"wrote {out}/loss_curve.png, metrics.json, model.npz")
    return metrics
