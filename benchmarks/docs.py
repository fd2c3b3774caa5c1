"""Figures in README.md and docs/*.md generated from the committed result files, never typed.

A generated block in a markdown file sits between two markers,

    <!-- generated: NAME from benchmarks/results/FILE -->
    ...
    <!-- end generated: NAME -->

and ``BLOCKS[NAME]`` renders it from that result file (which records the commit, date, machine and command of its
run). ``python -m benchmarks.docs --rewrite`` rewrites every block from its file; ``--check`` (the default) lists the
blocks that disagree with their files and exits 1; tests/test_docs_figures.py runs the check on every commit. A
result file measured on uncommitted code (its commit ends in -dirty) is refused: rerun it on a clean commit.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- generated: (?P<name>[\w-]+) from (?P<file>[\w./-]+) -->\n(?P<body>.*?)<!-- end generated: (?P=name) -->",
                    re.S)


class ResultError(ValueError):
    """A generated block whose result file is missing, unknown or measured on uncommitted code."""


def _provenance(data: dict, command: str) -> str:
    m = data["machine"]
    if str(m.get("commit", "")).endswith("-dirty") or not m.get("commit"):
        raise ResultError(f"measured on uncommitted code (commit {m.get('commit')!r}): rerun `{command}` on a clean commit")
    return f"commit {m['commit']}, {m['date'][:10]}, {m['cpu']} ({m['cores']} cores), `{command}`"


def _mean_sd(v: list[float]) -> str:
    return f"{statistics.mean(v):+.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"


def main_job(data: dict) -> str:
    r = data["run"]
    return (f"On the project's 2-core CPU machine it moves the reward over the same {r['eval_samples']} fixed-seed samples "
            f"from {r['before']:.2f} to {r['after']:.2f} (mean log-probability of the prompted digit; "
            f"{r['after'] - r['before']:+.2f}), {r['epochs']} epochs, {r['samples']} trajectories, peak resident memory "
            f"{r['peak_rss_mb']:.0f} MB, in {r['process_wall_s']:.0f} s ({r['train_wall_s']:.0f} s of it in the trainer's "
            f"loop, summary.json's wall_s): benchmarks/results/main_job.md ({_provenance(data, data['command'])}).\n")


def algos_table(data: dict) -> str:
    rows = []
    for algo, runs in data["results"].items():
        st = runs[0].get("settings", {})
        steps = f"{st.get('steps_per_epoch', 'n/a')} ({st.get('step_every', '')})"
        rows.append((algo, _mean_sd([r["after"]["mean"] - r["before"]["mean"] for r in runs]), steps))
    half = (len(rows) + 1) // 2
    lines = ["| algo | change | optimiser steps / epoch | | algo | change | optimiser steps / epoch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i in range(half):
        right = rows[half + i] if half + i < len(rows) else ("", "", "")
        lines.append(f"| {' | '.join(rows[i])} | | {' | '.join(right)} |")
    walls = [r["wall_s"] for runs in data["results"].values() for r in runs]
    lines += ["", f"Mean ± sd over seeds {', '.join(map(str, data['seeds']))}; {min(walls):.0f}-{max(walls):.0f} s per run "
              f"({_provenance(data, 'diffrl-fast experiment algos')}).", ""]
    return "\n".join(lines)


def fsdp_units(data: dict) -> str:
    lines = ["| model | units | largest unit (share, bf16) | root share | shards per process, full / LoRA | all-gathered bf16, bound |",
             "| --- | --- | --- | --- | --- | --- |"]
    by_model: dict[str, dict] = {}
    for r in data["rows"]:
        by_model.setdefault(r["model"], {})[r["mode"]] = r
    for model, modes in by_model.items():
        f, lo = modes["full"], modes["lora"]
        lines.append(f"| {model} ({f['params'] / 1e6:,.0f}M) | {f['units']} | `{f['largest_unit']}` ({100 * f['largest_unit_share']:.2f}%, "
                     f"{f['largest_unit_bf16_gib']:.3f} GiB) | {100 * f['root_share']:.2f}% | {f['shard_gib_per_process']:.2f} / "
                     f"{lo['shard_gib_per_process']:.2f} GiB (LoRA r={lo['lora_rank']}) | {f['gathered_bf16_gib_upper_bound']:.2f} GiB |")
    lines += ["", f"Counted, not measured; per process at {data['world']} processes ({_provenance(data, data['command'])}).", ""]
    return "\n".join(lines)


def ops_table(data: dict) -> str:
    full = {(r["provider"], tuple(r["shape"])): r for r in data["rows"] if r["mode"] == "full"}
    shapes = list(dict.fromkeys(shape for _, shape in full))
    lines = ["| full, median ms | eager | compile | cpp | cpp, recompute | cpp vs compile | cpp vs eager | MB held after forward (compile / cpp / recompute) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape in shapes:
        e, c, f, rc = (full[(p, shape)] for p in ("eager", "compile", "cpp", "cpp-recompute"))
        lines.append(f"| {list(shape)} | {e['median_ms']:.3f} | {c['median_ms']:.3f} | {f['median_ms']:.3f} | {rc['median_ms']:.3f} | "
                     f"{c['median_ms'] / f['median_ms']:.2f}x | {e['median_ms'] / f['median_ms']:.1f}x | "
                     f"{c['held_fwd_mb']:.1f} / {f['held_fwd_mb']:.1f} / {rc['held_fwd_mb']:.1f} |")
    m = data["machine"]
    faults = max(r.get("page_faults_per_call", 0.0) for r in data["rows"])
    bw = m.get("bandwidth_check_cpp")
    lines.append("")
    if bw:
        lines.append(f"The fused step at [32, 4, 128, 128] ran at {100 * bw['fraction']:.1f}% of a copy of the same "
                     f"{bw['traffic_bytes'] / 2**20:.0f} MiB timed in alternation with it ({100 * bw['fraction_min']:.1f}-"
                     f"{100 * bw['fraction_max']:.1f}% over {bw['rounds']} rounds), the C++ kernel call alone at "
                     f"{100 * bw['kernel_fraction']:.1f}%.")
    met = [t for t in m.get("targets", [])]
    if met:
        lines.append("Targets (issue 16): " + "; ".join(
            f"{t['metric'].replace('_', ' ')} at {t['shape']}: {t['measured']:g} against {t['target']:g} "
            f"({'met' if t['met'] else '**missed**'})" for t in met) + ".")
    lines += [f"Most page faults per call of any row: {faults:.3f} ({_provenance(data, 'diffrl-fast bench ops --min-time 2')}).", ""]
    return "\n".join(lines)


MEMORY_VARIANTS = {"pack all T": "all T packed in one forward", "pack all T + ckpt": "all T packed + gradient checkpointing",
                   "K = 5": "K = 5, each chunk backpropagated at once (the trainer)", "K = 5 + ckpt": "K = 5 + gradient checkpointing"}


def memory_table(data: dict) -> str:
    rows = data["rows"]
    steps = sorted({r["T"] for r in rows})
    cell = {(r["variant"], r["T"]): r for r in rows}
    lines = ["| variant | " + " | ".join(f"T = {T}" for T in steps) + f" | T = {steps[-1]} / T = {steps[0]} |",
             "| --- | " + " | ".join("---" for _ in steps) + " | --- |"]
    for name, label in MEMORY_VARIANTS.items():
        peaks = [cell[(name, T)]["peak_mb"] for T in steps]
        lines.append(f"| {label} | " + " | ".join(f"{p:.0f} MB" for p in peaks) + f" | {peaks[-1] / peaks[0]:.2f}x |")
    times = ", ".join(f"{cell[('K = 5 + ckpt', T)]['step_s']:.1f} s" for T in steps)
    lines += ["", f"Step time of K = 5 + gradient checkpointing at T = {', '.join(map(str, steps))}: {times} "
              f"({_provenance(data, 'diffrl-fast bench memory')}).", ""]
    return "\n".join(lines)


def flow_main_job(data: dict) -> str:
    r = data["run"]
    m = r["metrics"]["layout_correct"]
    return (f"On the project's 2-core CPU machine, over the same {r['eval_samples']} fixed-seed samples, the layout-correct rate "
            f"(every asked-for digit in its slot, as the classifier reads it) goes from {100 * m['before']:.1f}% "
            f"± {100 * m['before_se']:.1f} to {100 * m['after']:.1f}% ± {100 * m['after_se']:.1f} (paired change "
            f"{100 * m['change']:+.1f} ± {100 * m['change_se']:.1f} points; mean ± standard error) and the digit_layout reward "
            f"from {r['before']:.2f} to {r['after']:.2f}, {r['epochs']} epochs, {r['samples']} trajectories, peak resident "
            f"memory {r['peak_rss_mb']:.0f} MB, in {r['process_wall_s']:.0f} s ({r['train_wall_s']:.0f} s of it in the "
            f"trainer's loop): benchmarks/results/main_job_flow_digits.md ({_provenance(data, data['command'])}).\n")


def flow_digits_quality(data: dict) -> str:
    q = data["quality"]
    pct = lambda row: f"{100 * row['layout_correct']:.1f}% ± {100 * row['layout_correct_se']:.1f}"  # noqa: E731
    lines = ["| guidance g | " + " | ".join(f"{r['guidance_scale']:g}" for r in q["by_guidance"]) + " |",
             "| --- | " + " | ".join("---" for _ in q["by_guidance"]) + " |",
             "| layout correct, training prompts | " + " | ".join(pct(r) for r in q["by_guidance"]) + " |",
             "| mean digit_layout reward | " + " | ".join(f"{r['reward']:.2f}" for r in q["by_guidance"]) + " |",
             "", f"At g = {q['eval_guidance']:g}: held-out prompts {pct(q['heldout'])} layout correct. When only the first k "
             f"of the {q['num_steps']} steps see the prompt (the rest another prompt's): "
             + ", ".join(f"k = {r['k']}: {pct(r)}" for r in q["early_steps"]) + ".",
             *(_training_curve("The teacher during its training", data["teacher"].get("quality_curve"))
               + _training_curve("The shipped model during distillation", data["transformer"].get("quality_curve"))
               if "teacher" in data else _training_curve("During training", data["transformer"].get("quality_curve"))),
             "", f"{q['num_samples']} samples per figure, {q['num_steps']} SDE steps at noise level {q['noise_level']:g}, "
             f"mean ± standard error; {_training_time(data)} ({_provenance(data, data['command'])}).", ""]
    return "\n".join(lines)


def _training_curve(title: str, curve) -> list[str]:
    if not curve:
        return []
    return ["", f"{title} (EMA weights, 200 samples each, g = 1 / g = 3): " + ", ".join(
        f"step {r['step']}: {100 * r['layout_correct_g1']:.1f}% / {100 * r['layout_correct_g3']:.1f}%" for r in curve) + "."]


def _training_time(data: dict) -> str:
    t = data["transformer"]
    if "teacher" not in data:
        return f"the transformer trained {t['steps']} steps in {t['wall_time_s'] / 60:.1f} min"
    return (f"the teacher trained {data['teacher']['steps']} steps in {data['teacher']['wall_time_s'] / 60:.1f} min, the shipped "
            f"model was distilled from it at g = {data['distillation']['guidance_scale']:g} in {t['steps']} steps, "
            f"{t['wall_time_s'] / 60:.1f} min")


def sdxl_memory_table(data: dict) -> str:
    commit = str(data["versions"].get("commit", ""))
    if not commit or commit.endswith("-dirty") or commit == "unknown":
        raise ResultError(f"counted on uncommitted code (commit {commit!r}): rerun `python benchmarks/estimate_sdxl_memory.py` on a clean commit")
    rows = {}
    for r in data["table"]:
        rows.setdefault(r["config"], {})[r["checkpointing"]] = r
    lines = [f"| configuration | static, GiB | activations, GiB/row (no ckpt / ckpt) | peak at {data['default_rows']} rows with ckpt, GiB | max rows with ckpt |",
             "| --- | --- | --- | --- | --- |"]
    per_row = lambda r: max(r["forward_peak_gib"]["per_row"], r["backward_peak_gib"]["per_row"])  # noqa: E731
    for config, by_ckpt in rows.items():
        off, on = by_ckpt[False], by_ckpt[True]
        lines.append(f"| {config} | {on['static_gib']:.1f} | {per_row(off):.1f} / {per_row(on):.2f} | "
                     f"{on['peak_gib_at_16_rows']:.1f} | {on['max_rows']} |")
    v = data["versions"]
    lines += ["", f"Counted on the meta device, not measured (commit {commit}, torch {v['torch']}, diffusers {v['diffusers']}, "
              f"`python benchmarks/estimate_sdxl_memory.py`, {data['seconds']:.0f} s).", ""]
    return "\n".join(lines)


E2E_SIZES = {"tiny": "tiny (overhead-bound, 4x16x16)", "small": "small (compute-bound, 4x32x32)"}


def e2e_table(data: dict) -> str:
    s, r, pack = data["summary"], data["ratios"], data["pack"]
    lines = ["| pipeline | trl overall samples/s | diffrl_fast | speed (per seed) | peak memory trl / ours |",
             "| --- | --- | --- | --- | --- |"]
    for size, label in E2E_SIZES.items():
        if size not in s:
            continue
        trl, ours, q = s[size]["trl"], s[size]["diffrl_fast"], r[size]
        per_seed = ", ".join(f"{v:.2f}x" for v in q["overall_speedup_per_seed"])
        lines.append(f"| {label} | {trl['overall_samples_per_s']['median']:.3g} | {ours['overall_samples_per_s']['median']:.3g} "
                     f"(K = {pack.get(size, '1')}) | {q['overall_speedup']:.2f}x ({per_seed}) | "
                     f"{trl['peak_mem_mb']['median']:.0f} / {ours['peak_mem_mb']['median']:.0f} MB ({q['peak_mem_ratio']:.2f}x) |")
    bf16 = [f"{size} {s[size]['diffrl_fast_bf16']['overall_samples_per_s']['median']:.3g} samples/s "
            f"({s[size]['diffrl_fast_bf16']['overall_samples_per_s']['median'] / s[size]['trl']['overall_samples_per_s']['median']:.2f}x trl) "
            f"at {s[size]['diffrl_fast_bf16']['peak_mem_mb']['median']:.0f} MB"
            for size in E2E_SIZES if size in s and "diffrl_fast_bf16" in s[size]]
    if bf16:
        lines += ["", "bf16 autocast, a separate contender never part of the fp32 comparison: " + "; ".join(bf16) + "."]
    n = len(next(iter(s.values()))["trl"]["overall_samples_per_s"]["all"])
    rw = r.get("small", r.get("tiny"))["reward"]
    lines += ["", f"Medians of {n} seeds; the reward curves' {data['settings']['num_epochs']}-epoch means differ by "
              f"{abs(rw['difference_in_se']):.1f} standard errors on the small pipeline ({_provenance(data, 'diffrl-fast bench e2e --seeds 0,1,2')}, "
              f"trl 0.23.1, the bench extra).", ""]
    return "\n".join(lines)


E2E_CONTENDERS = {"trl": "trl", "diffrl_fast": "diffrl_fast (K = {K})", "diffrl_fast_unfused": "diffrl_fast_unfused (torch backend, K = 1)",
                  "diffrl_fast_bf16": "diffrl_fast_bf16 (bf16 autocast, K = {K}; not part of the fp32 comparison)"}


def e2e_detail(data: dict) -> str:
    s, pack = data["summary"], data["pack"]
    lines = ["| pipeline | contender | overall [range] | rollout | train | peak MB | vs trl: speed, memory |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for size, label in E2E_SIZES.items():
        if size not in s:
            continue
        trl = s[size]["trl"]
        for i, (c, name) in enumerate(E2E_CONTENDERS.items()):
            if c not in s[size]:
                continue
            row = s[size][c]
            o = row["overall_samples_per_s"]
            vs = "" if c == "trl" else (f"{o['median'] / trl['overall_samples_per_s']['median']:.2f}x, "
                                        f"{row['peak_mem_mb']['median'] / trl['peak_mem_mb']['median']:.2f}x")
            lines.append(f"| {label if i == 0 else ''} | {name.format(K=pack.get(size, '1'))} | {o['median']:.3g} "
                         f"[{min(o['all']):.3g}-{max(o['all']):.3g}] | {row['rollout_samples_per_s']['median']:.3g} | "
                         f"{row['train_samples_per_s']['median']:.3g} | {row['peak_mem_mb']['median']:.0f} | {vs} |")
    lines += ["", f"Medians over the seeds, samples/s ({_provenance(data, 'diffrl-fast bench e2e --seeds 0,1,2')}).", ""]
    return "\n".join(lines)


def _ttr_cell(values, spec):
    vals = [v for v in values if v is not None]
    if not vals:
        return "not reached"
    out = spec.format(statistics.mean(vals)) + (f" ± {spec.format(statistics.stdev(vals))}" if len(vals) > 1 else "")
    return out + ("" if len(vals) == len(values) else f" ({len(vals)}/{len(values)} seeds)")


def ttr_table(data: dict) -> str:
    """The time-to-reward table (bench time-to-reward's JSON), in both cost units, with the guards at the threshold."""
    m, s = data["machine"], data["summary"]
    world, base = m.get("world", "digits"), s["baseline"]
    sweep = m.get("sweep")
    command = (f"diffrl-fast bench time-to-reward --world {world} --contenders {','.join(s['table'])} "
               f"--seeds {','.join(map(str, m['seeds']))} "
               + (f"--budget-passes {m['budget_passes']:g}" if m.get("budget_passes") else f"--budget-s {m['budget_s']:g}")
               + (" --sweep" if sweep else ""))
    x = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731
    guards = [g for g in ("heldout", "heldout_prompts", "diversity") if any(f"{g}_at_threshold" in r for r in s["table"].values())]
    names = {"heldout": "held-out classifier", "heldout_prompts": "held-out prompts", "diversity": "diversity"}
    lines = [f"| contender | seeds reaching | denoiser passes to threshold | time to threshold (s) | speed-up vs {base}: passes / time | "
             + " | ".join(f"{names[g]} at threshold (start)" for g in guards) + " | final reward | learning rate |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in guards) + " | --- | --- |"]
    for name, row in s["table"].items():
        lr = row.get("learning_rate")
        lines.append(f"| {name} | {row['reached']}/{row['seeds']} | {_ttr_cell(row['passes'], '{:.3g}')} | {_ttr_cell(row['time_s'], '{:.1f}')} | "
                     f"{x(row.get('speedup_passes'))} / {x(row['speedup'])} | "
                     + " | ".join(f"{_ttr_cell(row[f'{g}_at_threshold'], '{:.3f}')} ({row[f'{g}_start']:.3f})" for g in guards)
                     + f" | {_ttr_cell(row['final_reward'], '{:.3f}')} | {'—' if lr is None else f'{lr:.2g}'} |")
    lines += ["", f"Threshold {s['threshold']:.3f}: 75% of the way from {base}'s eval reward before training ({s['baseline_start']:.3f}) "
              f"to the best of its seed-mean curve ({s['baseline_best']:.3f}); "
              + (f"{m['budget_passes']:g} denoiser passes" if m.get("budget_passes") else f"{m['budget_s']:g} s") + " of training per run, "
              f"{m['eval_samples']} fixed-seed eval samples per epoch; mean ± std over the seeds reaching it"
              + (f"; every contender's learning rate swept (x {sweep}, seed 0, picked on the training reward) before these seeds" if sweep else "")
              + f" ({_provenance(data, command)}).", ""]
    return "\n".join(lines)


def overopt_table(data: dict) -> str:
    """The over-optimisation experiment's findings (experiment overoptimisation's JSON): the held-out peak, the guard's
    stop and kept checkpoint against their targets, and GRPO-Guard's peak and replayed stop."""
    f, st = data["findings"], data["settings"]
    command = (f"diffrl-fast experiment overoptimisation --epochs {st['epochs']} --weight {st['weight']:g} --seed {st['seed']} "
               f"--guard-samples {st['guard_samples']}"
               + (f" --lr {st['lr']:g}" if st.get("lr") else ""))
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    stop = (f"epoch {f['stop_epoch']}, {f['evaluations_after_peak']} evaluation(s) after the peak ({met(f['stop_within_2_evaluations'])})"
            if f.get("stop_epoch") is not None else "no stop (missed)")
    kept = (f"epoch {f['kept_epoch']}, {f['kept_heldout']:+.3f}: {f['kept_gap']:.3f} below the peak ({met(f['kept_within_se'])})"
            if "kept_gap" in f else "—")
    gstop = (f"epoch {f['guard_replayed_stop_epoch']}" if f["guard_replayed_stop_epoch"] is not None
             else f"none in {f['grpo_guard_last_epoch']} epochs")
    lines = ["| | target | Flow-GRPO | Flow-GRPO + GRPO-Guard |", "| --- | --- | --- | --- |",
             f"| held-out peak | — | epoch {f['peak_epoch']}: {f['peak_heldout']:+.3f} ± {f['peak_se']:.3f} | "
             f"epoch {f['guard_peak_epoch']}: {f['guard_peak_heldout']:+.3f} |",
             f"| guard stop | within 2 evaluations after the peak | {stop} | {gstop} (the stop rule replayed on its evaluations) |",
             f"| kept checkpoint | within the peak's standard error | {kept} | — |",
             f"| held-out at the last epoch | — | {f['watch_last_heldout']:+.3f} (epoch {f['watch_last_epoch']}) | "
             f"{f['grpo_guard_last_heldout']:+.3f} (epoch {f['grpo_guard_last_epoch']}) |",
             "", f"Training reward digit_layout + {st['weight']:g} x brightness, held-out digit_layout_heldout on the guard's "
             f"{st['guard_samples']} fixed samples every {st['guard_every']} epoch(s), learning rate {st['learning_rate']:g} "
             f"({_provenance(data, command)}).", ""]
    return "\n".join(lines)


def reward_server_table(data: dict) -> str:
    """The reward server's load benchmark (bench reward-server's JSON): images/s, latency and the server's CPU time per
    request with and without dynamic batching, JSON against binary bodies at a generated image's size, the ratios
    against the targets, the reward's cost per call, the fuzz and the memory."""
    from benchmarks.bench_reward_server import body_pairs

    s = data["summary"]
    lines = ["| clients | mode | image side, body | images/s | p50 / p99 latency (ms) | images per reward call | server CPU per request (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        lines.append(f"| {r['clients']} | {r['mode']} | {r['size']}, {r['body']} | {r['images_per_s']:.0f} | {r['p50_ms']:.1f} / "
                     f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['server_cpu_ms_per_request']:.2f} |")
    top = max(r["clients"] for r in data["rows"])
    prof = s["reward_ms_per_call"]
    command = f"diffrl-fast bench reward-server --seconds {data['seconds']:g}"
    lines += ["", f"With {top} clients of 64x64 images dynamic batching scores {s['speedup']:.2f}x the images per second of one "
              f"request per reward call at {s['p99_ratio']:.2f}x its p99 latency; {s['mixed']} mixed replies, {s['errors']} errors; "
              f"a fuzz of {s['fuzz_cases']} malformed requests got {s['fuzz_4xx']} expected 4xx answers and {s['fuzz_5xx']} 5xx; "
              f"resident memory {s['rss_ratio']:.2f}x its after-warm-up value ({_provenance(data, command)}).", "",
              f"With one client the adaptive wait scores {s['one_client_adaptive_over_fixed']:.2f}x the images per second of "
              f"the fixed 5 ms wait and {s['one_client_adaptive_over_unbatched']:.2f}x those of no batching. The reward costs "
              + ", ".join(f"{ms:.1f} ms for {n} images" for n, ms in prof.items()) + f" ({s.get('device', 'cpu')}): a merged call saves at most "
              f"{s['reward_per_image_saving']:.2f}x per image. At {s['big_size']}x{s['big_size']} pixels binary bodies score "
              + " and ".join(f"{r['images_per_s'] / j['images_per_s']:.2f}x ({mode})" for mode, r, j in body_pairs(data))
              + " the images per second of JSON ones, at "
              + " and ".join(f"{r['server_cpu_ms_per_request'] / j['server_cpu_ms_per_request']:.2f}x" for _, r, j in body_pairs(data))
              + " the server's CPU time per request.", ""]
    return "\n".join(lines)


def video_memory_table(data: dict) -> str:
    """Peak memory of a small Wan's training step against frames (bench video-memory's JSON) and the line through it."""
    rows, fits = data["rows"], data["machine"]["fits"]
    frames = sorted({r["frames"] for r in rows})
    cell = {(r["frames"], r["ckpt"]): r for r in rows}
    lines = ["| frames F | latent frames | tokens | trajectory per sample | step peak, no ckpt | step peak, ckpt per block |",
             "| --- | --- | --- | --- | --- | --- |"]
    for F in frames:
        a, b = cell[(F, False)], cell[(F, True)]
        lines.append(f"| {F} | {a['latent_frames']} | {a['tokens']} | {a['trajectory_mb_per_sample']:.2f} MB | {a['peak_mb']:.0f} MB | "
                     f"{b['peak_mb']:.0f} MB |")
    fit = "; ".join(f"{k}: {v['slope_mb_per_frame']:.1f} MB per frame, R^2 {v['r2']:.3f}" for k, v in fits.items())
    lines += ["", f"Least squares through the peaks: {fit} ({_provenance(data, 'diffrl-fast bench video-memory')}).", ""]
    return "\n".join(lines)


def wan_memory_table(data: dict) -> str:
    """The counted Wan2.1 memory at 81 x 480 x 832 (estimate_wan_memory.py's JSON)."""
    g = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    lines = ["| model | base weights bf16, GiB | LoRA + grads + AdamW, GiB | one row, ckpt per block, GiB (+ per extra row) | "
             "one row, no ckpt, GiB | trajectory per sample, 10 trained steps / window of 2, fp32 (bf16 states) | UMT5-XXL bf16, GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["results"]:
        s, tr = list(r["static"].values()), list(r["trajectory_bytes_per_sample"].values())
        lines.append(f"| {r['model']} ({r['params'] / 1e9:.2f}B) | {g(s[0])} | {g(s[1])} | {g(r['ckpt']['peak_1_row'])} "
                     f"(+{g(r['ckpt']['per_row'])}) | {g(r['no_ckpt']['peak_1_row'])} | {tr[0] / 2**20:.0f} / {tr[1] / 2**20:.0f} MB "
                     f"({tr[2] / 2**20:.0f} / {tr[3] / 2**20:.0f} MB) | "
                     f"{g(r['text_encoder_bf16'])} |")
    m = data["machine"]
    if str(m.get("commit", "")).endswith("-dirty") or not m.get("commit"):
        raise ResultError("measured on uncommitted code: rerun `python benchmarks/estimate_wan_memory.py` on a clean commit")
    lines += ["", f"Counted on the meta device, not measured (commit {m['commit']}, torch {m['torch']}, diffusers {m['diffusers']}, "
              f"`python benchmarks/estimate_wan_memory.py`, {m['seconds']:.0f} s).", ""]
    return "\n".join(lines)


def pass_cost_table(data: dict) -> str:
    """Seconds per 1000 denoiser passes of rollout and update on the flow world (bench pass-cost's JSON)."""
    lines = ["| configuration | rows per update call (minibatch x chunk) | passes per epoch | rollout s | update s | s per 1000 passes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in data["rows"].items():
        lines.append(f"| {name} | {r['train_batch_size']} x {r['chunk_size']} | {r['passes_per_epoch']:.0f} | {r['sample_s']:.1f} | "
                     f"{r['train_s']:.1f} | {r['s_per_1000_passes']:.2f} |")
    lines += ["", f"({_provenance(data, 'diffrl-fast bench pass-cost')})", ""]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[dict], str]] = {"video_memory_table": video_memory_table, "wan_memory_table": wan_memory_table,
                                            "pass_cost_table": pass_cost_table,
                                            "reward_server_table": reward_server_table, "overopt_table": overopt_table, "ttr_table": ttr_table, "e2e_detail": e2e_detail, "main_job": main_job, "algos_table": algos_table, "fsdp_units": fsdp_units,
                                            "ops_table": ops_table, "memory_table": memory_table, "e2e_table": e2e_table,
                                            "flow_main_job": flow_main_job, "flow_digits_quality": flow_digits_quality,
                                            "sdxl_memory_table": sdxl_memory_table}
DOCS = ("README.md", "docs/*.md", "benchmarks/results/*.md")


def doc_files(root: Path = ROOT) -> list[Path]:
    return sorted({p for pattern in DOCS for p in root.glob(pattern)})


def render(name: str, file: str, root: Path = ROOT) -> str:
    """The block ``name`` rendered from the result file ``file`` (relative to the repository root)."""
    if name not in BLOCKS:
        raise ResultError(f"unknown generated block {name!r}; known: {sorted(BLOCKS)}")
    path = root / file
    if not path.is_file():
        raise ResultError(f"its result file {file} is missing: run the benchmark that writes it")
    return BLOCKS[name](json.loads(path.read_text()))


def check(root: Path = ROOT, rewrite: bool = False) -> list[str]:
    """Problems of every generated block of the docs ([] when all agree); with ``rewrite`` the blocks whose file
    renders are rewritten in place."""
    problems = []
    for doc in doc_files(root):
        text = doc.read_text()

        def replace(m: re.Match) -> str:
            where = f"{doc.relative_to(root)}: block {m['name']}"
            try:
                body = render(m["name"], m["file"], root)
            except (ResultError, KeyError, json.JSONDecodeError) as exc:
                problems.append(f"{where}: {exc}")
                return m.group(0)
            if body != m["body"]:
                problems.append(f"{where} disagrees with {m['file']}" + (" (rewritten)" if rewrite else ""))
            if not rewrite:
                return m.group(0)
            return f"<!-- generated: {m['name']} from {m['file']} -->\n{body}<!-- end generated: {m['name']} -->"

        new = MARKER.sub(replace, text)
        if rewrite and new != text:
            doc.write_text(new)
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.docs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rewrite", action="store_true", help="rewrite every generated block from its result file")
    args = ap.parse_args(argv)
    problems = check(rewrite=args.rewrite)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems and not (args.rewrite and all(p.endswith("(rewritten)") for p in problems)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
