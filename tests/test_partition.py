import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl_ray.data.partition import dirichlet, equal_subsets, iid, label_entropy, natural

LABELS = np.repeat(np.arange(10), 800)  # 8,000 samples, 10 classes


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_dirichlet_skew_depends_on_alpha():
    skewed = dirichlet(LABELS, 100, 0.1, seed=0, min_size=5)
    uniform = dirichlet(LABELS, 100, 100.0, seed=0, min_size=5)
    for parts in (skewed, uniform):
        assert_exact_cover(parts, len(LABELS))
        assert min(len(p) for p in parts) >= 5
    h_skew = label_entropy(LABELS, skewed, 10).mean()
    h_unif = label_entropy(LABELS, uniform, 10).mean()
    # log(10) = 2.303 is the uniform maximum
    assert h_skew < 1.0, h_skew
    assert h_unif > 2.1, h_unif


def test_dirichlet_deterministic_by_seed():
    a = dirichlet(LABELS, 20, 0.5, seed=3)
    b = dirichlet(LABELS, 20, 0.5, seed=3)
    c = dirichlet(LABELS, 20, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_balanced_caps_client_size():
    parts = dirichlet(LABELS, 20, 0.1, seed=0, balanced=True)
    assert_exact_cover(parts, len(LABELS))
    sizes = np.array([len(p) for p in parts])
    unbalanced = np.array([len(p) for p in dirichlet(LABELS, 20, 0.1, seed=0)])
    assert sizes.std() < unbalanced.std()


def test_min_size_impossible():
    with pytest.raises(ValueError, match="min_size"):
        dirichlet(LABELS[:50], 10, 0.1, seed=0, min_size=10)


def test_natural_with_sub_splits():
    groups = np.repeat(np.arange(6), 450)
    parts = natural(groups, 5, seed=0)
    assert len(parts) == 30
    assert_exact_cover(parts, len(groups))
    assert all(len(np.unique(groups[p])) == 1 for p in parts)


def test_equal_subsets_are_stratified():
    parts = equal_subsets(LABELS, 8, seed=0)
    assert_exact_cover(parts, len(LABELS))
    for p in parts:
        assert np.bincount(LABELS[p], minlength=10).tolist() == [100] * 10


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 400), k=st.integers(1, 15), alpha=st.floats(0.05, 50), seed=st.integers(0, 99))
def test_every_sample_once_property(n, k, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, 5, n)
    for parts in (
        iid(n, k, seed),
        dirichlet(labels, k, alpha, seed, min_size=0),
        equal_subsets(labels, k, seed),
    ):
        assert len(parts) == k
        assert_exact_cover(parts, n)
