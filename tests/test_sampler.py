"""The balanced sampler: counts, fractions, ignored labels, filling with negatives, determinism."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimask.backend import rng
from minimask.ops.matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, IGNORE
from minimask.ops.sampler import BalancedPositiveNegativeSampler

RPN = BalancedPositiveNegativeSampler(256, 0.5)
BOX_HEAD = BalancedPositiveNegativeSampler(512, 0.25)


def labels_with(positives: int, negatives: int, ignored: int, seed: int = 0):
    """A shuffled label array with the given counts (positives are classes 1..5)."""
    g = np.random.default_rng(seed)
    labels = np.concatenate(
        [
            g.integers(1, 6, positives),
            np.zeros(negatives, dtype=np.int64),
            g.choice([BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, IGNORE], ignored),
        ]
    )
    return g.permutation(labels)


@pytest.mark.parametrize(
    "sampler, positives, negatives, expected",
    [
        (RPN, 1000, 20000, (128, 128)),  # plenty of both: exactly the fraction
        (BOX_HEAD, 1000, 20000, (128, 384)),
        (RPN, 7, 20000, (7, 249)),  # few positives: filled up with negatives
        (BOX_HEAD, 300, 50, (128, 50)),  # few negatives: the minibatch is smaller
        (RPN, 0, 0, (0, 0)),  # nothing to sample
    ],
)
def test_counts_and_fractions(sampler, positives, negatives, expected):
    labels = labels_with(positives, negatives, ignored=500)
    pos, neg = sampler(labels, rng(0))
    assert (len(pos), len(neg)) == expected
    assert pos.dtype == neg.dtype == np.int64
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()


@given(
    hnp.arrays(np.int64, st.integers(0, 400), elements=st.integers(-3, 3)),
    st.integers(0, 300),
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    st.integers(0, 2**32 - 1),
)
def test_invariants(labels, batch, fraction, seed):
    pos, neg = BalancedPositiveNegativeSampler(batch, fraction)(labels, rng(seed))
    num_pos, num_neg = (labels >= 1).sum(), (labels == 0).sum()
    assert len(pos) == min(num_pos, int(batch * fraction))
    assert len(neg) == min(num_neg, batch - len(pos))
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()  # never an ignored label
    assert (np.diff(pos) > 0).all() and (np.diff(neg) > 0).all()  # sorted, no repeats


def test_same_seed_same_minibatch_and_different_seeds_differ():
    labels = labels_with(1000, 20000, 500)
    first = RPN(labels, rng(7))
    again = RPN(labels, rng(7))
    other = RPN(labels, rng(8))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[1], other[1])


def test_every_candidate_is_equally_likely():
    labels = np.array([1] * 10 + [0] * 10)
    sampler = BalancedPositiveNegativeSampler(4, 0.5)  # 2 of 10 positives, 2 of 10 negatives
    counts = np.zeros(len(labels))
    generator = rng(0)
    for _ in range(2000):
        pos, neg = sampler(labels, generator)
        counts[pos] += 1
        counts[neg] += 1
    # Each is picked with probability 1/5: 400 of 2000 times, standard deviation ~18.
    assert np.abs(counts - 400).max() < 90
