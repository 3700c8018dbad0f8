#!/usr/bin/env python3
"""Reference values for weft's Rényi accountant, from Google's dp-accounting (PyPI
`dp-accounting==0.6.0`, which needs scipy). Writes
crates/weft-privacy/tests/fixtures/rdp_reference.json; the Rust tests compare against it.

    python3 -m venv /tmp/dpvenv && /tmp/dpvenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpvenv/bin/python bench/dp_reference.py
"""
import json
import pathlib

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

ORDERS = rdp.DEFAULT_RDP_ORDERS
# (sampling rate, noise multiplier, steps, delta): the DP-SGD MNIST setting the literature quotes,
# weft's byte-model demo settings, no subsampling, tiny and large noise, and a large q.
CASES = [
    (256 / 60000, 1.1, 14062, 1e-5),
    (256 / 60000, 1.1, 1, 1e-5),
    (0.02, 0.8, 30, 1e-5),
    (0.02, 1.0, 60, 1e-5),
    (0.01, 0.6, 180, 1e-5),
    (0.5, 2.0, 100, 1e-6),
    (1.0, 1.5, 10, 1e-5),
    (0.001, 0.5, 1000, 1e-5),
    (0.1, 5.0, 500, 1e-7),
    (0.05, 0.3, 20, 1e-5),
]


def main():
    out = []
    for q, sigma, steps, delta in CASES:
        accountant = rdp.RdpAccountant(ORDERS)
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        accountant.compose(event)
        epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
        per_step = rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, ORDERS)
        out.append({
            "sample_rate": q,
            "noise_multiplier": sigma,
            "steps": steps,
            "delta": delta,
            "epsilon": float(epsilon),
            "optimal_order": float(order),
            # JSON has no infinity: an order dp-accounting gave up on (its sum did not converge) is null.
            "rdp_per_step": [float(r) if r != float("inf") else None for r in per_step],
        })
    # The figure the issue and stack.md quote: integer orders 2..256 only.
    accountant = rdp.RdpAccountant(list(range(2, 257)))
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1)), 14062))
    integer_epsilon, integer_order = accountant.get_epsilon_and_optimal_order(1e-5)
    integer_case = {"sample_rate": 256 / 60000, "noise_multiplier": 1.1, "steps": 14062, "delta": 1e-5,
                    "orders": list(range(2, 257)), "epsilon": float(integer_epsilon), "optimal_order": float(integer_order)}
    path = pathlib.Path(__file__).resolve().parent.parent / "crates/weft-privacy/tests/fixtures/rdp_reference.json"
    path.write_text(json.dumps({"generator": "dp-accounting 0.6.0, bench/dp_reference.py", "orders": list(ORDERS), "cases": out, "integer_orders_case": integer_case}, indent=1) + "\n")
    for case in out:
        print(f"q={case['sample_rate']:.6g} sigma={case['noise_multiplier']} steps={case['steps']} delta={case['delta']}: "
              f"epsilon={case['epsilon']!r} (order {case['optimal_order']})")


if __name__ == "__main__":
    main()
