import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl_ray.labels.iblt import IBLT, PEELING_OVERHEAD, PRIME, IBLTDecodeError, table_cells

ODD_LABELS = [
    "7",
    "seven",
    "hot dog",
    "  leading and trailing  ",
    "tab\tand\nnewline",
    "naïve café",
    "東京タワー",
    "снег",
    "🐶",
    "👩‍👩‍👧‍👦 family (ZWJ emoji)",
    "e\u0301 (combining accent)",
    "a",
    "a\x00",  # differs from "a" only by a trailing NUL: the length prefix keeps them apart
    "x" * 250,  # long
    "ü" * 125,  # long, 250 UTF-8 bytes
]


def test_roundtrip_unicode_emoji_long_and_spaced_labels():
    t = IBLT(capacity=32, seed=7, max_label_bytes=256)
    assert t.decode(t.encode(ODD_LABELS)) == dict.fromkeys(ODD_LABELS, 1)


def test_label_validation_names_the_limit():
    t = IBLT(capacity=8, max_label_bytes=16)
    with pytest.raises(ValueError, match="iblt_max_label_bytes=16"):
        t.encode(["ü" * 9])  # 18 bytes
    with pytest.raises(ValueError, match="non-empty"):
        t.encode([""])
    with pytest.raises(ValueError, match="exceed the table capacity 8"):
        t.encode([str(i) for i in range(9)])


def test_100_clients_random_subsets_of_1000_names_exact_union_and_counts():
    rng = random.Random(0)
    vocab = [f"{rng.choice(['red', 'small', 'wild', 'old'])} thing #{i} {'·' * (i % 5)}" for i in range(1000)]
    t = IBLT(capacity=1000, seed=3)
    truth: dict[str, int] = {}
    tables = []
    for _ in range(100):
        mine = rng.sample(vocab, rng.randint(1, 40))
        for name in mine:
            truth[name] = truth.get(name, 0) + 1
        tables.append(t.encode(mine))
    assert len(truth) > 800  # the union really is near capacity
    assert t.decode(t.add(*tables)) == truth


def test_overfull_table_raises_with_how_much_is_left():
    t = IBLT(capacity=16, seed=1)
    # every client is within capacity, but the union (160 labels) is 10x what the table can peel
    tables = [t.encode([f"c{c}-label{i}" for i in range(16)]) for c in range(10)]
    with pytest.raises(
        IBLTDecodeError, match=r"cells could not be peeled .*raise labels.iblt_capacity"
    ) as err:
        t.decode(t.add(*tables))
    msg = str(err.value)
    left = int(msg.split("failed: ")[1].split(" of ")[0])
    assert 0 < left <= t.cells


def test_counts_wrap_in_the_field():
    t = IBLT(capacity=8, seed=0)
    assert t.decode(t.encode({"a": PRIME - 1})) == {"a": -1}
    assert t.decode(t.encode({"a": PRIME + 2})) == {"a": 2}
    one, minus_one = t.encode(["a", "b"]), t.encode({"a": -1})
    assert t.decode(t.add(one, minus_one)) == {"b": 1}  # "a" cancels exactly
    assert t.decode(t.subtract(t.encode(["b"]), t.encode(["a", "b"]))) == {"a": -1}
    # linearity is exact: 7 copies of a table minus the same counts is the zero vector
    v = t.encode({"x": 3, "y": 5})
    assert not np.any(t.add(*([v] * 7), t.encode({"x": -21, "y": -35})))
    assert t.decode(t.encode({"big": 2**40})) == {"big": 2**40}


def test_tables_are_field_elements_and_shapes_checked():
    t = IBLT(capacity=8, seed=0)
    v = t.encode(["a", "b"])
    assert v.dtype == np.uint64 and v.shape == (t.vector_len,) and int(v.max()) < PRIME
    with pytest.raises(ValueError, match="shape"):
        t.decode(v[:-1])
    with pytest.raises(ValueError, match="outside"):
        t.decode(np.full(t.vector_len, PRIME, dtype=np.uint64))


def test_wrong_seed_or_corruption_is_an_error_not_a_wrong_union():
    a, b = IBLT(capacity=16, seed=1), IBLT(capacity=16, seed=2)
    v = a.encode([f"label {i}" for i in range(12)])
    with pytest.raises(IBLTDecodeError):
        b.decode(v)
    corrupted = v.copy()
    corrupted[5 * a.width + 2] = (int(corrupted[5 * a.width + 2]) + 1) % PRIME
    with pytest.raises(IBLTDecodeError):
        a.decode(corrupted)


def test_params_roundtrip_and_size_rule():
    t = IBLT(capacity=100, repetitions=3, seed=9, max_label_bytes=32)
    assert IBLT.from_params(t.describe()).describe() == t.describe()
    with pytest.raises(ValueError, match="cells"):
        IBLT.from_params({**t.describe(), "cells": t.cells + 3})
    for k, c in PEELING_OVERHEAD.items():
        for n in (1, 10, 100, 1000):
            cells = table_cells(n, k)
            assert cells % k == 0 and cells >= c * n


@pytest.mark.parametrize("capacity,trials", [(5, 1000), (64, 300), (256, 60)])
def test_measured_decode_failure_at_full_capacity(capacity, trials):
    """Tables filled to capacity with the default 4 repetitions: failure rates behind table_cells' margin.

    Deterministic (seeded hashes). Measured: 1/3000 at capacity 5, 0/800 at 64, 0/200 at 256, 0/40 at 1000.
    """
    failures = 0
    for seed in range(trials):
        t = IBLT(capacity, seed=seed)
        try:
            assert len(t.decode(t.encode([f"label {i}" for i in range(capacity)]))) == capacity
        except IBLTDecodeError:
            failures += 1
    assert failures <= 1


labels = st.text(min_size=1, max_size=12).filter(lambda s: len(s.encode()) <= 48)
multisets = st.dictionaries(labels, st.integers(-5, 5).filter(bool), max_size=20)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(a=multisets, b=multisets, seed=st.integers(0, 2**32))
def test_property_linear_sketch(a, b, seed):
    t = IBLT(capacity=64, seed=seed, max_label_bytes=48)
    assert t.decode(t.encode(a)) == a
    merged = {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}
    assert t.decode(t.add(t.encode(a), t.encode(b))) == {k: v for k, v in merged.items() if v}
    assert np.array_equal(t.subtract(t.add(t.encode(a), t.encode(b)), t.encode(b)), t.encode(a))
