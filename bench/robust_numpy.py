"""numpy baselines for bench/robust-vs-numpy: np.median and np.sort along the node axis."""
import json
import sys
import time

import numpy as np

n, length, repeats = (int(a) for a in sys.argv[1:4])
i = np.arange(n, dtype=np.int64)[:, None]
j = np.arange(length, dtype=np.int64)[None, :]
x = (((j * 7919 + i * 104729) % 10007).astype(np.float32) / np.float32(10007.0) - np.float32(0.5))
k = int(np.floor(0.2 * n))


def best(f):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


median_s = best(lambda: np.median(x, axis=0))
trimmed_s = best(lambda: np.sort(x, axis=0)[k:n - k].mean(axis=0))
print(json.dumps({"n": n, "len": length, "median_s": median_s, "trimmed_mean_s": trimmed_s,
                  "numpy": np.__version__}))
