"""End-to-end throughput: diffrl_fast's trainer against trl's DDPOTrainer on the same pipelines and settings.

Pipelines, built offline from configs with random weights (``diffrl_fast.models.tiny``):
    tiny   UNet block_out_channels (32, 64), latents 4x16x16 (overhead-bound)
    small  UNet block_out_channels (64, 128), 2 layers per block, latents 4x32x32 (compute-bound)
    sd15   SD 1.5's UNet (860M parameters), latents 4x64x64, tiny text encoder and VAE (for GPUs)
Settings (``e2e_trl.DEFAULT_SETTINGS``, shared by every contender): 10 sampling steps, classifier-free
guidance 5, sample batch 8 x 2 batches per epoch, train batch 8, 1 inner epoch, timestep fraction 1.0,
LoRA rank 4 on the attention projections, JPEG compressibility reward, 3 epochs, fp32, fixed seeds.

Contenders, each in a fresh process (clean peak-memory figures):
    trl                  trl 0.23.1's DDPOTrainer, unmodified (benchmarks/e2e_trl.py; optional `bench` extra)
    diffrl_fast          our trainer with everything on (see OURS)
    diffrl_fast_unfused  our trainer with the fused kernels off (torch backend) and packing K = 1
    diffrl_fast_bf16     (reported separately, never in the fp32 comparison) bf16 autocast of the denoiser
Per contender: rollout, training and overall samples/s, peak memory (peak resident set after the model is
loaded), reward per epoch. Writes benchmarks/results/e2e_<device>.{json,png}.

Run: ``diffrl-fast bench e2e [--sizes tiny,small] [--seeds 0,1,2] [--pack tiny=2,small=1]``; ``--pack`` overrides
the packing K of the "everything on" contenders (a sweep: one run per K, ``--contenders diffrl_fast``).
``--resummarize FILE`` recomputes a results file's summary, ratios and chart from its raw runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info  # noqa: E402
from benchmarks.e2e_trl import DEFAULT_SETTINGS  # noqa: E402

SIZES = {"tiny": {}, "small": {"block_out_channels": (64, 128), "layers_per_block": 2, "latent_size": 32},
         # SD 1.5's UNet (860M parameters, 8 heads, 768-d cross-attention) at 64x64 latents, tiny text encoder and VAE:
         # the GPU suite's size (benchmarks/gpu/suite.py)
         "sd15": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "latent_size": 64,
                  "cross_attention_dim": 768, "num_heads": 8}}
# "Everything on": the fused C++ step loss, rewards overlapped with the next rollout batch, the denoiser in
# channels_last, and timestep packing K chosen per pipeline by measurement (benchmarks/results/e2e.md): on the
# overhead-bound tiny pipeline K = 2 (in a 3-seed --pack sweep, 9.8-10.0 training samples/s against 9.1 for
# K = 1 and 6.5-9.7, erratic, for K = 5 and 10 at 1.4-2 GB); on the compute-bound small one K = 1, because a 160-row
# packed forward held 11.6 GB and ran at half the speed of K = 1 (page faults on huge buffers).
PACK = {"tiny": "2", "small": "1", "sd15": "2"}
OURS = {
    "diffrl_fast": {"overrides": ["train.chunk_size={pack}", "reward.overlap=true", "model.channels_last=true"], "env": {}},
    "diffrl_fast_unfused": {"overrides": ["train.chunk_size=1", "reward.overlap=false"], "env": {"DIFFRL_FAST_BACKEND": "torch"}},
    "diffrl_fast_bf16": {"overrides": ["train.chunk_size={pack}", "reward.overlap=true", "model.channels_last=true",
                                       "model.mixed_precision=bf16"], "env": {}},
}


def our_overrides(s: dict, pipeline: str, seed: int, out: Path) -> list[str]:
    """The shared settings as diffrl_fast config overrides (the same meanings as trl's DDPOConfig mapping)."""
    return [
        f"model.path={pipeline}", "model.lora=true", f"model.lora_rank={s['lora_rank']}", f"model.lora_alpha={s['lora_rank']}",
        "model.lora_targets=[to_q, to_k, to_v, to_out.0]", f"model.mixed_precision={s['mixed_precision']}",
        f"sample.num_steps={s['num_steps']}", f"sample.guidance_scale={s['guidance_scale']}", f"sample.eta={s['eta']}",
        f"sample.batch_size={s['sample_batch_size']}", f"sample.num_batches_per_epoch={s['sample_num_batches_per_epoch']}",
        f"train.batch_size={s['train_batch_size']}", f"train.num_inner_epochs={s['num_inner_epochs']}",
        f"train.timestep_fraction={s['timestep_fraction']}", f"train.gradient_accumulation_steps={s['gradient_accumulation_steps']}",
        f"train.learning_rate={s['learning_rate']}", f"train.clip_range={s['clip_range']}", f"train.adv_clip_max={s['adv_clip_max']}",
        f"train.max_grad_norm={s['max_grad_norm']}", f"advantage.per_prompt_stat_tracking={str(s['per_prompt_stat_tracking']).lower()}",
        f"advantage.buffer_size={s['buffer_size']}", f"advantage.min_count={s['min_count']}", f"num_epochs={s['num_epochs']}",
        f"reward.name={s['reward']}", "prompts=[" + ", ".join(s["prompts"]) + "]", f"seed={seed}", "algo=ddpo_is",
        "log.eval_samples=0", "log.progress=false", "log.tensorboard=false", f"output_dir={out}", "name=e2e",
    ]


def run_ours(pipeline: str, variant: str, seed: int, out: Path, settings: dict, size: str = "small", pack: str = "") -> dict:
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer
    from diffrl_fast.utils.memory import PeakMemory

    s = {**DEFAULT_SETTINGS, **settings}
    pack = pack or PACK.get(size, "1")
    pack = str(s["num_steps"]) if pack == "all" else pack
    overrides = [o.replace("{pack}", pack) for o in OURS[variant]["overrides"]]
    cfg = validate(load_config(Config, None, [*our_overrides(s, pipeline, seed, out), *overrides]))
    trainer = Trainer(cfg, out / "e2e", log_fn=lambda m: None)
    trainer.logger.print = lambda m: None
    memory = PeakMemory(trainer.device)
    memory.reset()
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "e2e" / "metrics.jsonl").read_text().splitlines()]
    n = recs[0]["samples"]
    rollout = sum(r["sample_time_s"] for r in recs)
    train = sum(r["train_time_s"] for r in recs)
    epochs = [r["sample_time_s"] + r["train_time_s"] for r in recs]
    return {"rollout_samples_per_s": n * len(recs) / rollout, "train_samples_per_s": n * len(recs) * s["num_inner_epochs"] / train,
            "overall_samples_per_s": n * len(recs) / sum(epochs), "peak_mem_mb": memory.peak_mb(),
            "reward_per_epoch": [r["reward_mean"] for r in recs], "epoch_times_s": epochs,
            "epoch_rollout_times_s": [r["sample_time_s"] for r in recs], "epoch_train_times_s": [r["train_time_s"] for r in recs],
            "wall_s_with_checkpoints": wall, "samples_per_epoch": n, "threads": torch.get_num_threads(), "seed": seed}


def launch(contender: str, pipeline: str, seed: int, settings: dict, tmp: Path, size: str = "small", pack: str = "") -> dict:
    out = tmp / f"{contender}_{size}_{seed}"
    if contender == "trl":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e_trl.py"), "--pipeline", pipeline, "--seed", str(seed),
               "--out", str(out), "--settings-json", json.dumps(settings)]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, __file__, "--worker", json.dumps({"variant": contender, "pipeline": pipeline, "seed": seed, "size": size,
                                                                 "out": str(out), "settings": settings, "pack": pack})]
        env = {**os.environ, **OURS[contender]["env"]}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{contender} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(runs: dict) -> tuple[dict, dict]:
    """Medians over seeds per contender, and diffrl_fast against trl per pipeline.

    ``runs[size][contender]`` lists one result per seed, in the same seed order for every contender. Ratios:
    speed = median overall samples/s of ours / trl's (and per seed), memory = median peak / trl's. Reward
    agreement: each run's mean reward over its epochs; the difference of the two contenders' means over seeds
    in units of its standard error sqrt(s_a^2/n_a + s_b^2/n_b) (seeds are not paired: the trainers draw
    different random streams); null with fewer than 2 seeds.
    """
    keys = ("overall_samples_per_s", "rollout_samples_per_s", "train_samples_per_s", "peak_mem_mb")
    summary = {size: {c: {k: {"median": statistics.median(r[k] for r in rs), "all": [r[k] for r in rs]} for k in keys}
                      for c, rs in by.items()} for size, by in runs.items()}
    ratios = {}
    for size, by in runs.items():
        if "trl" not in by or "diffrl_fast" not in by:
            continue
        ours, trl = by["diffrl_fast"], by["trl"]
        med = summary[size]
        ratios[size] = {"overall_speedup": med["diffrl_fast"]["overall_samples_per_s"]["median"] / med["trl"]["overall_samples_per_s"]["median"],
                        "peak_mem_ratio": med["diffrl_fast"]["peak_mem_mb"]["median"] / med["trl"]["peak_mem_mb"]["median"],
                        "overall_speedup_per_seed": [a["overall_samples_per_s"] / b["overall_samples_per_s"] for a, b in zip(ours, trl)],
                        "peak_mem_ratio_per_seed": [a["peak_mem_mb"] / b["peak_mem_mb"] for a, b in zip(ours, trl)]}
        a = [statistics.mean(r["reward_per_epoch"]) for r in ours]
        b = [statistics.mean(r["reward_per_epoch"]) for r in trl]
        if len(a) > 1 and len(b) > 1:
            diff = statistics.mean(a) - statistics.mean(b)
            se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
            ratios[size]["reward"] = {"ours_mean": statistics.mean(a), "trl_mean": statistics.mean(b), "difference": diff,
                                      "se_of_difference": se, "difference_in_se": diff / se if se > 0 else float("inf")}
        else:
            ratios[size]["reward"] = None
    return summary, ratios


def report(ratios: dict) -> None:
    for size, r in ratios.items():
        line = (f"{size}: diffrl_fast / trl overall {r['overall_speedup']:.2f}x (per seed "
                f"{', '.join(f'{x:.2f}' for x in r['overall_speedup_per_seed'])}), peak memory {r['peak_mem_ratio']:.2f}x")
        if r["reward"]:
            w = r["reward"]
            line += (f"; mean reward {w['ours_mean']:.3f} vs {w['trl_mean']:.3f}: difference {w['difference']:+.3f} = "
                     f"{w['difference_in_se']:+.2f} SE")
        print(line)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(summary)
    metrics = [("overall_samples_per_s", "overall samples/s"), ("rollout_samples_per_s", "rollout samples/s"),
               ("train_samples_per_s", "training samples/s"), ("peak_mem_mb", "peak memory (MB)")]
    fig, axes = plt.subplots(len(sizes), len(metrics), figsize=(4 * len(metrics), 3.2 * len(sizes)), squeeze=False)
    for i, size in enumerate(sizes):
        names = list(summary[size])
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            vals = [summary[size][n][key]["median"] for n in names]
            ax.bar(range(len(names)), vals, color=[{"trl": "C3"}.get(n, "C0" if "bf16" not in n else "C2") for n in names])
            ax.set_xticks(range(len(names)), [n.replace("diffrl_fast", "ours") for n in names], rotation=20, fontsize=7)
            ax.set_title(f"{size}: {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--contenders", default="trl,diffrl_fast,diffrl_fast_unfused,diffrl_fast_bf16")
    ap.add_argument("--settings-json", default="{}", help="overrides of the shared settings (e.g. fewer epochs for a smoke run)")
    ap.add_argument("--pack", default="", help="packing K per pipeline for the everything-on contenders, e.g. tiny=5,small=1 ('all' = every step)")
    ap.add_argument("--resummarize", type=Path, help="recompute summary, ratios and chart of an existing results JSON from its runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        result = run_ours(job["pipeline"], job["variant"], job["seed"], Path(job["out"]), job["settings"], job["size"], job["pack"])
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.resummarize:
        data = json.loads(args.resummarize.read_text())
        data["summary"], data["ratios"] = summarize(data["runs"])
        report(data["ratios"])
        args.resummarize.write_text(json.dumps(data, indent=1) + "\n")
        plot(data["summary"], args.resummarize.with_suffix(".png"))
        return 0
    try:
        pack = dict(item.split("=") for item in args.pack.split(",")) if args.pack else {}
    except ValueError:
        print(f"--pack {args.pack!r}: expected size=K pairs, e.g. tiny=2,small=1", file=sys.stderr)
        return 2
    unknown = set(pack) - set(SIZES)
    if unknown or not all(k == "all" or k.isdigit() and int(k) > 0 for k in pack.values()):
        print(f"--pack {args.pack!r}: sizes are {sorted(SIZES)} and K a positive integer or 'all'", file=sys.stderr)
        return 2
    from diffrl_fast.models.tiny import cached_tiny_pipeline

    contenders = args.contenders.split(",")
    if "trl" in contenders:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: pip install -e '.[bench]' (trl 0.23.1); running without it", file=sys.stderr)
            contenders.remove("trl")
    settings = json.loads(args.settings_json)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            pipeline = cached_tiny_pipeline("sd", **SIZES[size])
            for seed in seeds:  # interleave contenders per seed so drifts in machine load hit all alike
                for c in contenders:
                    r = launch(c, pipeline, seed, settings, Path(tmp), size, pack.get(size, ""))
                    runs.setdefault(size, {}).setdefault(c, []).append(r)
                    print(f"{size:>5} {c:>20} seed {seed}: overall {r['overall_samples_per_s']:6.2f} samples/s, rollout "
                          f"{r['rollout_samples_per_s']:6.2f}, train {r['train_samples_per_s']:6.2f}, peak {r['peak_mem_mb']:7.0f} MB, "
                          f"reward {[round(x, 3) for x in r['reward_per_epoch']]}", flush=True)
    summary, ratios = summarize(runs)
    meta = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    report(ratios)
    stem = f"e2e_{meta['device']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": meta, "settings": {**DEFAULT_SETTINGS, **settings},
                                                       "ours": OURS, "pack": {**PACK, **pack}, "summary": summary, "ratios": ratios, "runs": runs}, indent=1) + "\n")
    plot(summary, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
