"""How fast `dsv3 estimate-cost` answers, as a ratio to `python -c pass` measured in the same run,
and proof that it never imports torch.

Boundary: runs the CLI in fresh interpreters (what a user's shell does) and times them; no numbers
of the cost model are checked here (tests/test_costs.py does that).

    python benchmarks/estimate_cost.py            # 9 runs each, medians
    python benchmarks/estimate_cost.py --runs 21
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

TARGET_S = 0.5
CASES = {
    "python -c pass": ["-c", "pass"],
    "dsv3 --help": ["-m", "dsv3cli.app", "--help"],
    "dsv3 estimate-cost": ["-m", "dsv3cli.app", "estimate-cost"],
    "dsv3 estimate-cost --json": ["-m", "dsv3cli.app", "estimate-cost", "--json"],
    "dsv3 estimate-cost --preset kimi-k2 --section inference --gpu H200": [
        "-m", "dsv3cli.app", "estimate-cost", "--preset", "kimi-k2", "--section", "inference", "--gpu", "H200"],
}
NO_TORCH = (
    "import sys\nfrom dsv3cli.app import app\n"
    "try:\n    app(['estimate-cost', '--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
    "sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\n"
    "sys.exit(3 if 'torch' in sys.modules else 0)\n"
)


def wall(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh interpreter running `args`. CPU time barely moves
    when other jobs load the machine; wall time is what the user waits for on a quiet one."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    w = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return w, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    runs = ap.parse_args().runs
    for args in CASES.values():  # warm the page cache and .pyc files
        wall(args)
    # Interleave the cases so a burst of load on the machine hits all of them alike.
    times: dict[str, list[float]] = {k: [] for k in CASES}
    cpu: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(runs):
        for k, args in CASES.items():
            w, c = wall(args)
            times[k].append(w)
            cpu[k].append(c)
    base, base_cpu = statistics.median(times["python -c pass"]), statistics.median(cpu["python -c pass"])
    print(f"{'command':<66} {'wall s':>7} {'min s':>6} {'x pass':>7} {'CPU s':>6} {'x pass':>7}")
    for k in CASES:
        w, c = statistics.median(times[k]), statistics.median(cpu[k])
        print(f"{k:<66} {w:7.3f} {min(times[k]):6.3f} {w / base:7.2f} {c:6.3f} {c / base_cpu:7.2f}")
    est, est_cpu = statistics.median(times["dsv3 estimate-cost"]), statistics.median(cpu["dsv3 estimate-cost"])
    verdict = "under" if est < TARGET_S else "OVER"
    load = os.getloadavg()[0]
    print(f"dsv3 estimate-cost: {est:.3f} s wall median = {est / base:.2f}x python -c pass ({est_cpu:.3f} s CPU = "
          f"{est_cpu / base_cpu:.2f}x); {verdict} the {TARGET_S} s target; load average {load:.1f} on {os.cpu_count()} CPUs")
    r = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True)
    print(r.stderr.strip())
    assert r.returncode == 0, f"dsv3 estimate-cost imported torch or failed: {r.stderr}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
