"""The planner's random numbers: a counter-based generator, integer arithmetic only.

splitmix64 (Steele et al., "Fast splittable pseudorandom number generators",
OOPSLA 2014): a stream's state is a uint64 counter advanced by the golden
gamma, and every draw is the finaliser `mix` of the new state, so the same
key gives the same numbers on any machine. `stream_key` derives a stream's
key from (seed, epoch, a, b, stream); `substream` the starting state of one
(view, sample) of it.

A draw takes the state and returns (new state, value): threaded through as
a value, the state stays in a register. (Kept in an array, LLVM must reload
it after every store to an output array, as they may alias: a third of the
kernels' time or more.)
"""
from __future__ import annotations

import math

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, inline="always")
def mix(z):
    # splitmix64 finaliser: a bijection of uint64.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def stream_key(seed, epoch, a, b, stream):
    # (a, b) is (0, 0) for the epoch-wide streams; the mosaic grouping uses
    # (first position, length) of a rank's batch.
    k = mix(np.uint64(seed) + GOLDEN)
    k = mix(k ^ (np.uint64(epoch) + GOLDEN))
    k = mix(k ^ (np.uint64(a) + GOLDEN))
    k = mix(k ^ (np.uint64(b) + GOLDEN))
    return mix(k ^ (np.uint64(stream) + GOLDEN))


@numba.njit(cache=True, inline="always")
def substream(key, a, b):
    """The starting state of substream (a, b) of `key`."""
    return mix(key ^ mix(np.uint64(a) * GOLDEN + np.uint64(b)))


@numba.njit(cache=True, inline="always")
def draw_uniform(state, lo, hi):
    """(state, float64 uniform in [lo, hi)) from the draw's top 53 bits."""
    state = state + GOLDEN
    u = np.float64(mix(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return state, lo + (hi - lo) * u


@numba.njit(cache=True, inline="always")
def draw_index(state, n):
    """(state, uniform integer in [0, n)) as floor(U * n) of a draw_uniform U."""
    state, u = draw_uniform(state, 0.0, 1.0)
    r = np.int64(u * n)
    return state, (r if r < n else n - 1)


@numba.njit(cache=True, inline="always")
def draw_index_multiply_shift(state, n):
    """(state, uniform integer in [0, n)) for 0 < n < 2**32 by a 32-bit
    multiply-shift of the draw's high half (Lemire 2019, without the
    rejection: bias below n / 2**32). No float conversions, so a short
    dependency chain where one draw's range is another's result."""
    state = state + GOLDEN
    return state, np.int64(((mix(state) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@numba.njit(cache=True, inline="always")
def draw_arcsine(state):
    """(state, Beta(0.5, 0.5) value): the arcsine law, sin^2(pi/2 * U)."""
    state, u = draw_uniform(state, 0.0, 1.0)
    v = math.sin(0.5 * math.pi * u)
    return state, v * v
