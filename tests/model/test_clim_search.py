"""CLIM's k-means and neighbour search within a memory budget (issue 25):
the chunk is sized from the budget, and the results do not depend on it."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import resolve_config, rules
from model.methods.clim import GB, bank_neighbours, chunk_rows, kmeans, kmeans_bytes, neighbour_bytes


@given(n=st.integers(1, 2_000_000), d=st.sampled_from([16, 128, 256]), kk=st.integers(1, 32),
       k=st.integers(1, 4096), threads=st.integers(1, 16), itemsize=st.sampled_from([2, 4]),
       budgets=st.lists(st.floats(0.001, 64.0), min_size=2, max_size=5))
def test_the_neighbour_chunk_shrinks_with_the_budget_and_fits_it(n, d, kk, k, threads, itemsize, budgets):
    fixed, per_row = neighbour_bytes(n, n, d, kk, k, threads, itemsize)
    chunks = [chunk_rows(b * GB, fixed, per_row, n) for b in sorted(budgets)]
    assert chunks == sorted(chunks) and all(1 <= c <= n for c in chunks)
    for b, c in zip(sorted(budgets), chunks):
        assert c == 1 or fixed + c * per_row <= b * GB           # within the budget unless nothing fits
        assert c == n or fixed + (c + 1) * per_row > b * GB      # and the largest chunk that fits


@given(n=st.integers(1, 2_000_000), d=st.sampled_from([16, 128]), k=st.integers(1, 4096),
       budgets=st.lists(st.floats(0.001, 64.0), min_size=2, max_size=5))
def test_the_kmeans_chunk_shrinks_with_the_budget_and_fits_it(n, d, k, budgets):
    fixed, per_row = kmeans_bytes(n, d, k)
    chunks = [chunk_rows(b * GB, fixed, per_row, n) for b in sorted(budgets)]
    assert chunks == sorted(chunks) and all(1 <= c <= n for c in chunks)
    for b, c in zip(sorted(budgets), chunks):
        assert c == 1 or fixed + c * per_row <= b * GB


def test_the_default_budget_holds_at_imagenet_size():
    """Issue 25's target: N = 1.28M rows of 128-d float16 keys, k = 5, 1000
    centres, 2 CPU threads: the formula's peak stays within 2 GB, with a
    chunk of hundreds of rows (the old fixed 4096 needed 21 GB)."""
    n = 1_281_167
    fixed, per_row = neighbour_bytes(n, n, 128, 5, 1000, threads=2, itemsize=2)
    chunk = chunk_rows(2 * GB, fixed, per_row, n)
    assert 100 < chunk < 4096 and fixed + chunk * per_row <= 2 * GB
    fixed, per_row = kmeans_bytes(n, 128, 1000, itemsize=2)
    assert fixed + chunk_rows(2 * GB, fixed, per_row, n) * per_row <= 2 * GB


def bank(seed: int, n: int, k: int, empty: int):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    filled = torch.ones(n, dtype=torch.bool)
    filled[torch.randperm(n, generator=g)[:min(empty, n - 1)]] = False
    centres = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    return feats, filled, centres


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 120), k=st.integers(1, 6), knn=st.integers(1, 8),
       same=st.booleans(), empty=st.integers(0, 20), chunk=st.integers(1, 130))
def test_the_neighbour_table_does_not_depend_on_the_chunk(seed, n, k, knn, same, empty, chunk):
    feats, filled, centres = bank(seed, n, k, empty)
    whole = bank_neighbours(feats, filled, centres, knn, same, torch.Generator().manual_seed(seed), chunk=n)
    for c in (1, chunk, n):
        table = bank_neighbours(feats, filled, centres, knn, same, torch.Generator().manual_seed(seed), chunk=c)
        assert torch.equal(table, whole), c


@pytest.mark.parametrize("room", [None, 9, 1, 0])
def test_a_small_budget_shrinks_the_neighbour_chunk_and_keeps_the_table(room):
    """A budget with room for `room` chunk rows beyond the fixed part (None:
    the default 2 GB) searches that many anchors at a time (at least one)."""
    feats, filled, centres = bank(3, 300, 4, 10)
    m, threads = int(filled.sum()), torch.get_num_threads()
    fixed, per_row = neighbour_bytes(300, m, 8, 5, 4, threads)
    budget_bytes = 2 * GB if room is None else fixed + room * per_row
    assert chunk_rows(budget_bytes, fixed, per_row, m) == (m if room is None else max(room, 1))
    whole = bank_neighbours(feats, filled, centres, 5, True, torch.Generator().manual_seed(0), chunk=m)
    table = bank_neighbours(feats, filled, centres, 5, True, torch.Generator().manual_seed(0),
                            memory_gb=budget_bytes / GB)
    assert torch.equal(table, whole)
    assert table[filled].ge(0).any()                                  # the table names neighbours


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 200), k=st.integers(1, 8), chunk=st.integers(1, 210),
       half=st.booleans())
def test_kmeans_centres_do_not_depend_on_the_chunk(seed, n, k, chunk, half):
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    x = x.half() if half else x
    k = min(k, n)
    whole = kmeans(x, k, 5, torch.Generator().manual_seed(seed), chunk=n)
    for c in (1, chunk):
        assert torch.equal(kmeans(x, k, 5, torch.Generator().manual_seed(seed), chunk=c), whole), c
    budget = kmeans_bytes(n, 16, k, x.element_size())[0] + 3 * (4 * k + 8)   # room for 3 rows a chunk
    assert torch.equal(kmeans(x, k, 5, torch.Generator().manual_seed(seed), memory_gb=budget / GB), whole)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_config_refuses_a_budget_that_is_not_positive(value):
    cfg, _ = resolve_config(["--method", "clim", "--neighbour-memory-gb", value])
    with pytest.raises(rules.ConfigError, match=r"--neighbour-memory-gb .*allowed: a number > 0"):
        rules.check(cfg)
