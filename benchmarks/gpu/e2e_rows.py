"""The GPU suite's end-to-end step: ``bench e2e`` at SD 1.5 size, an fp32 row and a bf16 row, trl 0.23.1 against
diffrl_fast, each row a separate run so that a timeout keeps the rows already done.

    python -m benchmarks.gpu.e2e_rows --out DIR [--epochs 2] [--size sd15]     # writes DIR/e2e_gpu.json

bf16 means the same for both contenders: trl's accelerate mixed precision, our ``model.mixed_precision``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from benchmarks import bench_e2e

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", default="sd15", choices=sorted(bench_e2e.SIZES))
    ap.add_argument("--contenders", default="trl,diffrl_fast")
    args = ap.parse_args(argv)
    rows = {}
    for precision, mp in (("fp32", "no"), ("bf16", "bf16")):
        row_dir = args.out / precision
        settings = json.dumps({"num_epochs": args.epochs, "mixed_precision": mp})
        code = bench_e2e.main(["--sizes", args.size, "--seeds", "0", "--contenders", args.contenders, "--settings-json", settings,
                               "--out", str(row_dir)])
        files = list(row_dir.glob("e2e_*.json"))
        rows[precision] = json.loads(files[0].read_text()) if code == 0 and files else {"error": f"exit {code}"}
        (args.out / "e2e_gpu.json").write_text(json.dumps({"size": args.size, "rows": rows}, indent=1) + "\n")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
