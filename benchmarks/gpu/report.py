"""The GPU targets (issue 15) against the suite's files: by how much each is met or missed."""
from __future__ import annotations

import json
from pathlib import Path

SHAPE = [32, 4, 128, 128]


def _ratio(a, b):
    return a / b if a and b else float("nan")


def targets(out: Path) -> list[str]:
    """Markdown lines: each GPU target (issues 15 and 31) with the measured figure from ``out``'s files, met or not."""
    lines = ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    ops = out / "ops_gpu.json"
    if ops.is_file():
        data = json.loads(ops.read_text())
        rows = {(r["provider"], r["mode"], tuple(r["shape"])): r for r in data["rows"]}
        tri, eager, comp = (rows.get((p, "full", tuple(SHAPE))) for p in ("triton", "eager", "compile"))
        if tri and eager and comp:
            se, sc = _ratio(eager["median_ms"], tri["median_ms"]), _ratio(comp["median_ms"], tri["median_ms"])
            lines += [f"| triton PPO step loss {SHAPE} fp32 full >= 5x eager | {se:.2f}x | {'yes' if se >= 5 else 'no'} |",
                      f"| ... >= 1.0x torch.compile | {sc:.2f}x | {'yes' if sc >= 1 else 'no'} |"]
            bw = data["machine"].get("bandwidth_check_triton")
            if bw:  # a copy of the same bytes timed in alternation with the step (bench ops' interleaved_bandwidth)
                lines.append(f"| ... >= 75% of copy bandwidth (same-bytes copy, interleaved: {bw['copy_gbs_median']:.0f} GB/s) | "
                             f"{bw['fraction']:.0%} (large-buffer copy: {tri['copy_fraction']:.0%}) | "
                             f"{'yes' if bw['fraction'] >= 0.75 else 'no'} |")
            else:
                lines.append(f"| ... >= 75% of copy bandwidth ({data['machine'].get('copy_bandwidth_gbs', 0):.0f} GB/s) | "
                             f"{tri['copy_fraction']:.0%} | {'yes' if tri['copy_fraction'] >= 0.75 else 'no'} |")
        else:
            cut = " (the run was cut short)" if data.get("machine", {}).get("partial") else ""
            lines.append(f"| triton PPO step loss {SHAPE} fp32 full vs eager, torch.compile, copy bandwidth | "
                         f"not measured{cut} | no |")
    e2e = out / "e2e_gpu.json"
    if e2e.is_file():
        data = json.loads(e2e.read_text())
        for precision, row in data["rows"].items():
            r = row.get("ratios", {}).get(data["size"]) if isinstance(row, dict) else None
            if not r:
                errors = row.get("errors") or {} if isinstance(row, dict) else {}
                why = "; ".join(f"{c} failed" for c in errors) or "no result"
                lines.append(f"| e2e {precision}: >= 2x trl samples/s at <= 0.7x peak memory | {why} | no |")
                continue
            sp, mem = r["overall_speedup"], r["peak_mem_ratio"]
            lines.append(f"| e2e {precision}: >= 2x trl samples/s, peak memory <= 0.7x | {sp:.2f}x, {mem:.2f}x | "
                         f"{'yes' if sp >= 2 and mem <= 0.7 else 'no'} |")
    mem = out / "memory_gpu.json"
    if mem.is_file():
        for r in json.loads(mem.read_text())["rows"]:
            lines.append(f"| SDXL {r['mode']} {r['rows']} rows: measured / counted working memory | "
                         f"{r.get('measured_over_estimated_working', float('nan')):.2f} ({r['measured_working_gib']:.1f} / "
                         f"{r.get('estimated_peak', float('nan')):.1f} GiB) | n/a |")
    rs = out / "rewardserver_gpu.json"
    if rs.is_file():  # issue 31's targets, on a GPU reward (bench reward-server --device cuda --quick)
        data = json.loads(rs.read_text())
        s = data.get("summary")
        if s is None:  # cut short: the rows it measured are in the file
            lines.append(f"| reward server, 16 clients: batching >= 3x one request per call | not measured (the run was cut "
                         f"short after {len(data.get('rows', []))} rows) | no |")
            return lines
        lines += [f"| reward server, 16 clients: batching >= 3x one request per call, p99 <= 2x ({s['tower']}) | "
                  f"{s['speedup']:.2f}x, p99 {s['p99_ratio']:.2f}x | {'yes' if s['speedup'] >= 3 and s['p99_ratio'] <= 2 else 'no'} |",
                  f"| ... 0 mixed replies, 0 errors | {s['mixed']} mixed, {s['errors']} errors | "
                  f"{'yes' if s['mixed'] == 0 and s['errors'] == 0 else 'no'} |"]
    return lines
