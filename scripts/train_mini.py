"""Rebuild checkpoints/dsv3-mini: train the small DeepSeek-V3-architecture model on the synthetic
corpus (CPU, deterministic for a seed), export it in the hub layout (BF16) and validate it.

Boundary: argument parsing and printing only; the work is in scripts/mini_train.py.

Examples:
    python scripts/train_mini.py                                # the shipped checkpoint
    python scripts/train_mini.py --out /tmp/mini --steps 50     # a quick smoke run
    python scripts/train_mini.py --measure-only                 # MTP acceptance/speedup of the shipped one
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    import mini_train as train
    from dsv3cli.checkpoint import validate

    d = train.TrainSettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "dsv3-mini"))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--gamma", type=float, default=d.gamma, help="bias update speed (the report: 0.001)")
    ap.add_argument("--mtp-weight", type=float, default=d.mtp_weight, help="λ, weight of the MTP loss")
    ap.add_argument("--balance-weight", type=float, default=d.balance_weight, help="α, sequence-wise balance loss")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads (results are bitwise stable for a fixed count)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--measure", action="store_true", help="after training, measure MTP acceptance and speedup (K = 0, 1)")
    ap.add_argument("--measure-only", action="store_true", help="only measure the checkpoint at --out")
    a = ap.parse_args()

    out = Path(a.out)
    if not a.measure_only:
        s = train.TrainSettings(seed=a.seed, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                                gamma=a.gamma, mtp_weight=a.mtp_weight, balance_weight=a.balance_weight,
                                threads=a.threads)

        def log(r: dict) -> None:
            if r["step"] % a.log_every == 0 or r["step"] == s.steps - 1:
                print(f"step {r['step']:4d}  loss {r['loss']:.4f}  main {r['main']:.4f}  mtp {r['mtp']:.4f}  "
                      f"balance {r['balance']:.3f}  maxvio {r['max_vio']:.3f}  {r['s']:.0f}s", file=sys.stderr, flush=True)

        out.mkdir(parents=True, exist_ok=True)
        res = train.train(s, out, log)
        nbytes = train.export(res.model, out, s)
        rep = validate(out)
        if not rep.ok:
            print("\n".join(rep.problems), file=sys.stderr)
            return 1
        last = res.history[-10:]
        summary = {
            "out": str(out),
            "steps": s.steps,
            "tokens": s.steps * s.batch_size * s.seq_len,
            "train_wall_s": round(res.wall_s, 1),
            "final_main_loss": round(sum(r["main"] for r in last) / len(last), 4),
            "final_mtp_loss": round(sum(r["mtp"] for r in last) / len(last), 4),
            "final_max_vio": round(sum(r["max_vio"] for r in last) / len(last), 4),
            "first_max_vio": round(res.history[0]["max_vio"], 4),
            "tensor_bytes": nbytes,
            "folder_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        }
        print(json.dumps(summary, indent=2))
    if a.measure or a.measure_only:
        t0 = time.perf_counter()
        m = train.measure_mtp(out)
        print(json.dumps({str(k): v for k, v in m.items()}, indent=2))
        print(f"measured in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
