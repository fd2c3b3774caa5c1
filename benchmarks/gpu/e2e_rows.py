"""The GPU suite's end-to-end step: ``bench e2e`` at SD 1.5 size, an fp32 row and a bf16 row, trl 0.23.1 against
diffrl_fast, each contender of each row a separate process (``bench_e2e.launch``).

    python -m benchmarks.gpu.e2e_rows --out DIR [--epochs 2] [--size sd15]     # writes DIR/e2e_gpu.json

DIR/e2e_gpu.json is rewritten after every contender, so a timeout keeps what is done. A contender that fails
(or is not installed) is recorded as its row's ``errors[contender]`` and the rest still runs: the other
contender of the row and the next row (bf16 after fp32). A row's ``ratios`` need both contenders.

bf16 means the same for both contenders: trl's accelerate mixed precision, our ``model.mixed_precision``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROWS = (("fp32", "no"), ("bf16", "bf16"))


def write(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, replaced atomically (the suite copies it while the step runs)."""
    tmp = path.with_name(path.name + ".writing")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def error_text(exc: BaseException) -> str:
    """A failure as recorded in the results: the exception and the end of its message (a contender's stderr)."""
    return f"{type(exc).__name__}: {str(exc)[-3000:]}"


def main(argv=None) -> int:
    """Run every (row, contender); 0 when all of them produced a result."""
    from benchmarks import bench_e2e

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", default="sd15", choices=sorted(bench_e2e.SIZES))
    ap.add_argument("--contenders", default="trl,diffrl_fast")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "e2e_gpu.json"
    contenders = args.contenders.split(",")
    rows = {precision: {"runs": {}, "errors": {}} for precision, _ in ROWS}
    data = {"size": args.size, "contenders": contenders, "rows": rows}
    try:
        import torch

        from benchmarks.common import machine_info
        from diffrl_fast.models.tiny import cached_tiny_pipeline

        data["machine"] = machine_info("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = cached_tiny_pipeline("sd", **bench_e2e.SIZES[args.size])
    except Exception as exc:  # nothing can run: say why, in the file the suite brings back
        for row in rows.values():
            row["errors"]["setup"] = error_text(exc)
        write(path, data)
        traceback.print_exc()
        return 1
    write(path, data)
    with tempfile.TemporaryDirectory() as tmp:
        for precision, mp in ROWS:
            row = rows[precision]
            settings = {"num_epochs": args.epochs, "mixed_precision": mp}
            row["settings"] = settings
            (Path(tmp) / precision).mkdir()
            for c in contenders:
                try:
                    r = bench_e2e.launch(c, pipeline, 0, settings, Path(tmp) / precision, args.size)
                    row["runs"][c] = [r]
                    print(f"{precision} {c}: overall {r['overall_samples_per_s']:.2f} samples/s, peak {r['peak_mem_mb']:.0f} MB",
                          flush=True)
                except Exception as exc:  # recorded; the other contender and the next row still run
                    row["errors"][c] = error_text(exc)
                    print(f"{precision} {c}: FAILED {row['errors'][c][-2000:]}", flush=True)
                if row["runs"]:
                    summary, ratios = bench_e2e.summarize({args.size: row["runs"]})
                    row["summary"], row["ratios"] = summary, ratios
                write(path, data)
    failed = [f"{p}/{c}" for p, row in rows.items() for c in row["errors"]]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
