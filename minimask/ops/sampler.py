"""Balanced sampling of positives and negatives for one training minibatch.

An image has tens of thousands of anchors, nearly all background. Training on all of them would
drown the few positives, so each image contributes a fixed-size random minibatch with at most a
given fraction of positives (Faster R-CNN §3.1.3: 256 anchors per image, up to 1:1; Fast R-CNN
§2.3 and Mask R-CNN §3.1: 512 RoIs per image, 25% positive). When an image has fewer positives than
that, the minibatch is filled up with negatives, as in torchvision.

Labels follow torchvision's convention (what the matcher's output becomes after labelling):
``>= 1`` positive (a class, or 1 for "object"), ``0`` negative (background), ``< 0`` ignored
(between thresholds, crowd): ignored entries are never sampled.

Randomness comes only from the generator passed in (``minimask.backend.rng(seed)``), so a seed
fixes the minibatch. The selection is vectorized: every candidate draws a random key, and the
``k`` smallest keys win (a uniformly random subset of size ``k``, like ``randperm(n)[:k]``).

Shape letters:
    N  anchors (RPN) or proposals (box head) of one image
"""

from __future__ import annotations

from minimask.backend import get_array_module


def _random_subset(candidates, k: int, generator):
    """``k`` entries of the 1-D array ``candidates`` chosen uniformly at random, sorted."""
    xp = get_array_module(candidates)
    n = candidates.shape[0]
    if k >= n:
        return candidates
    if k == 0:
        return candidates[:0]
    keys = generator.random(n)  # (n,) one uniform key per candidate
    chosen = xp.argpartition(keys, k - 1)[:k]  # the k smallest keys, in no particular order
    return xp.sort(candidates[chosen])


class BalancedPositiveNegativeSampler:
    """Pick ``batch_size_per_image`` labels per image, at most ``positive_fraction`` positive.

    Args:
        batch_size_per_image: minibatch size per image (256 for the RPN, 512 for the box head).
        positive_fraction: the largest share of positives (0.5 for the RPN, 0.25 for the box
            head); ``int(batch_size_per_image * positive_fraction)`` positives at most.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __repr__(self) -> str:
        return (
            f"BalancedPositiveNegativeSampler(batch_size_per_image={self.batch_size_per_image}, "
            f"positive_fraction={self.positive_fraction})"
        )

    def __call__(self, labels, generator):
        """Sample one image's minibatch.

        Args:
            labels: (N,) integers: >= 1 positive, 0 negative, < 0 ignored.
            generator: a seeded generator of the labels' array library, e.g.
                ``minimask.backend.rng(seed, xp)``.

        Returns:
            ``(positive_idx, negative_idx)``: int64 index arrays into ``labels``, increasing,
            disjoint, of sizes ``P = min(#positives, int(batch * fraction))`` and
            ``min(#negatives, batch - P)``.
        """
        xp = get_array_module(labels)
        positive = xp.flatnonzero(labels >= 1).astype(xp.int64)
        negative = xp.flatnonzero(labels == 0).astype(xp.int64)

        num_pos = int(self.batch_size_per_image * self.positive_fraction)
        num_pos = min(positive.shape[0], num_pos)  # too few positives: take them all
        num_neg = min(negative.shape[0], self.batch_size_per_image - num_pos)  # fill the rest

        return (
            _random_subset(positive, num_pos, generator),
            _random_subset(negative, num_neg, generator),
        )
