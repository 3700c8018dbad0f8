#!/usr/bin/env python3
"""Flower's SecAgg+ masking on the same vector sizes as weft's secagg_bench: one member's
quantize + self mask + k - 1 pairwise masks + modulo, and the collector's unmasking with one
member dropped (sum, survivors' self masks off, the dropped member's pairwise masks off), with
Flower's own functions (flwr.common.secure_aggregation: quantize, pseudo_rand_gen — numpy's
MT19937 seeded by the key folded to 32 bits). Median of RUNS runs; one JSON line per
(length, members).

    python bench/secagg_flower.py [LENGTH...]      # needs `pip install flwr numpy`
"""
import json
import os
import sys
import time

import numpy as np
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

RUNS = 5
# Flower's SecAgg+ defaults (secaggplus_workflow): 2^22 quantization range, modulus 2^32.
TARGET_RANGE = 1 << 22
MOD_RANGE = 1 << 32
CLIPPING_RANGE = 1.0


def median(values):
    return sorted(values)[len(values) // 2]


def mask(update, members, run):
    dims = [update.shape]
    quantized = quantize([update], CLIPPING_RANGE, TARGET_RANGE)
    masked = [q.astype(np.int64) for q in quantized]
    self_mask = pseudo_rand_gen(os.urandom(32), MOD_RANGE, dims)
    masked = [m + s for m, s in zip(masked, self_mask)]
    for peer in range(1, members):
        pairwise = pseudo_rand_gen(bytes([peer, run]) * 16, MOD_RANGE, dims)
        masked = [m + p if peer % 2 else m - p for m, p in zip(masked, pairwise)]
    return [np.mod(m, MOD_RANGE) for m in masked]


def unmask(masked_updates, members, run):
    dims = [masked_updates[0][0].shape]
    total = [np.sum([m[0] for m in masked_updates], axis=0)]
    for survivor in range(members - 1):
        self_mask = pseudo_rand_gen(bytes([survivor, run]) * 16, MOD_RANGE, dims)
        total = [t - s for t, s in zip(total, self_mask)]
    for survivor in range(members - 1):
        pairwise = pseudo_rand_gen(bytes([survivor, 255, run]) * 32, MOD_RANGE, dims)
        total = [t + p for t, p in zip(total, pairwise)]
    return [np.mod(t, MOD_RANGE) for t in total]


def main():
    lengths = [int(a) for a in sys.argv[1:]] or [120_576, 1_000_000]
    for length in lengths:
        for members in (3, 5):
            update = ((np.arange(length) % 1000) / 1000.0 - 0.5).astype(np.float32) * 0.1
            mask_s, unmask_s = [], []
            for run in range(RUNS):
                started = time.perf_counter()
                first = mask(update, members, run)
                mask_s.append(time.perf_counter() - started)
                others = [mask(update, members, run) for _ in range(members - 2)]
                started = time.perf_counter()
                unmask([first, *others], members, run)
                unmask_s.append(time.perf_counter() - started)
            m = median(mask_s)
            print(json.dumps({"length": length, "members": members, "mask_seconds": m,
                              "mask_values_per_second": length / m,
                              "unmask_seconds_one_dropped": median(unmask_s), "runs": RUNS}))


if __name__ == "__main__":
    main()
