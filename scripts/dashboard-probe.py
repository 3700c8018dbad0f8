#!/usr/bin/env python3
"""Measures a live dashboard's latency while a coordinator runs, and inside its rounds' closing.

    scripts/dashboard-probe.py ADDRESS STORAGE [SECONDS]

ADDRESS is the dashboard's (e.g. 127.0.0.1:8760, from `weft coordinator serve --dashboard`),
STORAGE the coordinator's storage directory. Fetches /metrics, / and /rounds/1 every 0.2 s for
SECONDS (default 240) or until the dashboard stops answering after it first did, then prints
latency figures overall and for requests that overlapped a round's closing (from the rounds'
timing in the journal, read read-only). Standard library only.
"""
import json
import sqlite3
import sys
import time
import urllib.error
import urllib.request


def quantile(values, q):
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    address, storage = sys.argv[1], sys.argv[2]
    seconds = float(sys.argv[3]) if len(sys.argv) == 4 else 240.0
    samples, answered, end = [], False, time.time() + seconds
    while time.time() < end:
        down = False
        for path in ("/metrics", "/", "/rounds/1"):
            start = time.time()
            try:
                with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as reply:
                    reply.read()
                    status = reply.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                down = True
                continue
            answered = True
            samples.append((start, time.time(), path, status))
        if down and answered:
            break
        time.sleep(0.2)
    db = sqlite3.connect(f"file:{storage}/state.sqlite?mode=ro", uri=True)
    closings = []
    for round_, record in db.execute("SELECT round, record FROM rounds ORDER BY round"):
        timing = json.loads(record).get("timing")
        if timing:
            closed = timing["closed_unix_ms"] / 1e3
            closings.append((round_, closed - timing["aggregation_ms"] / 1e3, closed))
    ok = [s for s in samples if s[3] == 200]
    if not ok:
        sys.exit("the dashboard answered nothing")
    latency = sorted((e - s) * 1e3 for s, e, _, _ in ok)
    during = sorted((e - s) * 1e3 for s, e, _, _ in ok if any(s < c1 and e > c0 for _, c0, c1 in closings))
    print(f"{len(ok)} requests answered ({len(samples) - len(ok)} not 200) over {ok[-1][1] - ok[0][0]:.0f} s")
    # The first request may wait for the coordinator to start serving (it loads its model first).
    after_first = sorted((e - s) * 1e3 for s, e, _, _ in ok[1:]) or [0.0]
    print(f"all: median {quantile(latency, 0.5):.1f} ms, p95 {quantile(latency, 0.95):.1f} ms, "
          f"worst {latency[-1]:.1f} ms (the first request: {(ok[0][1] - ok[0][0]) * 1e3:.1f} ms; "
          f"worst after it {after_first[-1]:.1f} ms)")
    for round_, c0, c1 in closings:
        print(f"round {round_}: closing took {c1 - c0:.1f} s")
    if during:
        print(f"inside a closing: {len(during)} requests, median {quantile(during, 0.5):.1f} ms, worst {during[-1]:.1f} ms")


if __name__ == "__main__":
    main()
