"""What a run writes into runs/<name>/: the resolved config, metrics.jsonl (and TensorBoard), progress bars,
one log line per epoch, reward_curve.png, before/after image grids of the same seeds, final weights and
summary.md."""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from .._extras import require
from ..config_utils import provenance_lines, to_dict
from .config import reward_label


def image_grid(images: torch.Tensor, path: Path, cols: Optional[int] = None, scale: int = 1) -> Path:
    """Save images [N, C, H, W] in [0, 1] (C = 1 or 3) as one PNG grid with a 2-pixel border."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    pad = 2
    canvas = torch.ones((3, rows * (h + pad) + pad, cols * (w + pad) + pad))
    imgs = images.detach().float().cpu().clamp(0, 1)
    if c == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 scales its built-in font; older ones have one bitmap size
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def filmstrip(images: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """Images for a grid: images [N, C, H, W] unchanged; videos [N, F, C, H, W] as [N, C, H, k W], k <= ``max_frames``
    evenly spaced frames (the first and the last among them) side by side."""
    if images.dim() != 5:
        return images
    F = images.shape[1]
    idx = torch.linspace(0, F - 1, min(F, max_frames)).round().long()
    frames = images[:, idx]
    return frames.permute(0, 2, 3, 1, 4).reshape(images.shape[0], images.shape[2], images.shape[3], -1)


def labelled_grid(images: torch.Tensor, captions: list[dict], cols: Optional[int] = None, title: str = ""):
    """A PIL image: images [N, C, H, W] in [0, 1] in a grid, each above its caption.

    ``captions[i]`` holds "prompt" and "reward", and where the digit classifier judged the image "slots": a
    (prompted digit, its top class) pair per digit the prompt asks for, each drawn as a green check when they agree
    and a red cross with the digit it saw when not, left to right in the prompt's slot order. Small images (the 16x16 digits) are enlarged with nearest-neighbour sampling to at least 96
    pixels, so every pixel stays visible and the captions fit. ``title``: lines (split at newlines) above the grid.
    """
    from PIL import Image, ImageDraw

    n, c, h, w = images.shape
    if len(captions) != n:
        raise ValueError(f"labelled_grid: {n} images but {len(captions)} captions")
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(96 / w))
    cw, ch = w * scale, h * scale
    size = max(11, min(cw // 9, 28))
    font = _font(size)
    line = int(size * 1.3)
    pad = max(4, size // 3)
    titles = [t for t in title.split("\n") if t] if title else []
    top = len(titles) * line + pad if titles else 0
    cell_w, cell_h = cw + pad, ch + 2 * line + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, top + rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles):
        draw.text((pad, pad // 2 + j * line), _fit(draw, t, font, canvas.width - 2 * pad), fill="black", font=font)
    imgs = images.detach().float().cpu().clamp(0, 1)
    if c == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    arrays = (imgs.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    green, red = (0, 140, 0), (200, 0, 0)
    for i, cap in enumerate(captions):
        r, q = divmod(i, cols)
        x, y = pad + q * cell_w, top + pad + r * cell_h
        tile = Image.fromarray(arrays[i])
        canvas.paste(tile.resize((cw, ch), Image.NEAREST) if scale > 1 else tile, (x, y))
        ty = y + ch + 1
        draw.text((x, ty), _fit(draw, str(cap.get("prompt", "")), font, cw), fill="black", font=font)
        reward = cap.get("reward")
        text = "" if reward is None else f"r {reward:+.4g}"
        draw.text((x, ty + line), text, fill=(60, 60, 60), font=font)
        m = size * 0.7  # each mark, drawn (fonts may lack the glyphs), then the digit the classifier saw
        gap = size * 0.3
        marks = [(int(t) == int(p), int(p)) for t, p in cap.get("slots", [])]
        mx = x + cw - sum(m + (0 if ok else draw.textlength(f" {p}", font=font)) for ok, p in marks) - gap * max(0, len(marks) - 1)
        my = ty + line + (line - m) / 2
        width = max(2, size // 7)
        for ok, pred in marks:
            colour = green if ok else red
            if ok:
                draw.line([(mx, my + m * 0.55), (mx + m * 0.35, my + m), (mx + m, my)], fill=colour, width=width)
                mx += m + gap
            else:
                draw.line([(mx, my), (mx + m, my + m)], fill=colour, width=width)
                draw.line([(mx, my + m), (mx + m, my)], fill=colour, width=width)
                draw.text((mx + m, ty + line), f" {pred}", fill=colour, font=font)
                mx += m + draw.textlength(f" {pred}", font=font) + gap
    return canvas


def caption_summary(captions: list[dict]) -> str:
    """ "k/n top class = prompt" for captions that carry the digit classifier's verdicts ("slots"; with several digits
    per prompt, "k/n layouts correct": every slot right), else ""."""
    judged = [c for c in captions if c.get("slots")]
    if not judged:
        return ""
    hits = sum(all(int(t) == int(p) for t, p in c["slots"]) for c in judged)
    if all(len(c["slots"]) == 1 for c in judged):
        return f"{hits}/{len(judged)} top class = prompt"
    return f"{hits}/{len(judged)} layouts correct (every slot's top class = prompt)"


class _Bars:
    def __init__(self, enabled: bool, cfg) -> None:
        self.enabled, self.cfg = enabled, cfg

    @contextlib.contextmanager
    def sampling(self, epoch: int) -> Iterator[Optional[object]]:
        if not self.enabled:
            yield None
            return
        from tqdm.auto import tqdm

        s = self.cfg.sample
        total = s.num_steps * s.num_batches_per_epoch
        with tqdm(total=total, desc=f"epoch {epoch + 1} sampling", unit="step", leave=False) as bar:
            yield lambda j, T: bar.update(1)

    @contextlib.contextmanager
    def training(self, epoch: int, rows: int) -> Iterator[Optional[object]]:
        if not self.enabled:
            yield None
            return
        from tqdm.auto import tqdm

        with tqdm(total=rows, desc=f"epoch {epoch + 1} training", unit="row", leave=False) as bar:
            yield bar


class RunLogger:
    """metrics.jsonl (always), TensorBoard (when enabled; a one-line warning when it is not installed), Weights &
    Biases (log.wandb=true; an error naming the extra when it is not installed), and a console line per epoch.
    TensorBoard and W&B also get a labelled grid of each epoch's samples and the before/after grids."""

    def __init__(self, run_dir: Path, cfg, print_fn=print) -> None:
        self.run_dir, self.cfg, self.print = Path(run_dir), cfg, print_fn
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None  # the wandb Run

    def start(self) -> None:
        """Create the run folder, write config.yaml and open the TensorBoard writer and the W&B run where enabled."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lines = provenance_lines(self.cfg)
        header = "".join(f"#   {line}\n" for line in lines)
        if header:  # where each non-default value came from (the layers of config_utils.resolve_config)
            header = "# Values that differ from the defaults, and the layer that set each:\n" + header + "\n"
        (self.run_dir / "config.yaml").write_text(header + yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        if self.cfg.log.tensorboard and self.tb is None:
            try:
                require("tensorboard", "log.tensorboard=true")
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # not installed, or one torch cannot use: metrics.jsonl still has everything
                self.print(f"warning: {exc}; logging to metrics.jsonl only (log.tensorboard=false silences this)")
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.cfg.log.wandb and self.wandb is None:
            self.wandb = self._start_wandb()

    def _start_wandb(self):
        wandb = require("wandb", "log.wandb=true")
        log = self.cfg.log
        # the run's id is kept in the run folder, so that a resumed run continues the same W&B run
        id_file = self.run_dir / "wandb_run_id"
        kwargs = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.exists() else {}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(self.run_dir)  # wandb adds its own wandb/ folder inside
        run = wandb.init(project=log.wandb_project, name=self.cfg.name, config=to_dict(self.cfg),
                         mode=log.wandb_mode or None, **kwargs)
        if run.id:
            id_file.write_text(run.id + "\n")
        return run

    @property
    def wants_images(self) -> bool:
        """Whether a logger here takes each epoch's sample grid (TensorBoard or W&B is open)."""
        return self.tb is not None or self.wandb is not None

    def log_grid(self, tag: str, grid, step: int, title: str = "") -> None:
        """A grid image (PIL, e.g. ``labelled_grid``'s) to TensorBoard (``add_image``) and W&B, as ``tag`` at ``step``."""
        if self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(grid, caption=title or None)}, step=step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer and finish the W&B run (the logger can be started again)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def bars(self, enabled: bool = True) -> _Bars:
        return _Bars(enabled and self.cfg.log.progress, self.cfg)

    def records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def log_epoch(self, record: dict, samples: Optional[tuple[torch.Tensor, list[dict]]] = None) -> None:
        """Append (or, after a resume, replace) the epoch's record in metrics.jsonl, send its scalars to TensorBoard
        and W&B, redraw reward_curve.png and print one line. ``samples``: (images, captions) of a few of the epoch's
        samples, logged as the grid "samples" where TensorBoard or W&B is open."""
        kept = [r for r in self.records() if r["epoch"] < record["epoch"]]  # a resumed run rewrites later epochs
        # written to a temporary file and renamed: a kill at any moment leaves a complete metrics.jsonl
        tmp = self.metrics_path.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for r in kept + [record]:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["epoch"])
        if samples is not None and self.wants_images and samples[0].numel():
            images, captions = samples
            if max(images.shape[-2:]) > 256:  # an SD-size grid every epoch: 256-pixel tiles keep it quick to encode
                f = 256 / max(images.shape[-2:])
                size = (max(1, round(images.shape[-2] * f)), max(1, round(images.shape[-1] * f)))
                images = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
            verdict = caption_summary(captions)
            title = f"epoch {record['epoch']}: {len(captions)} of its samples" + (f"\n{verdict}" if verdict else "")
            self.log_grid("samples", labelled_grid(images, captions, title=title), record["epoch"], title)
        r = record
        extra = (f"clipfrac {r['clipfrac']:.3f}  " if "clipfrac" in r else "") + (f"approx_kl {r['approx_kl']:.2e}  " if "approx_kl" in r else "")
        e = record["epoch"]
        if e <= 20 or e % 10 == 0 or e >= self.cfg.num_epochs:  # matplotlib grows slowly with every figure drawn
            self.plot_rewards()
        self.print(
            f"epoch {r['epoch']:>3}/{self.cfg.num_epochs}  reward {r['reward_mean']:+.4f} ± {r['reward_std']:.4f}  "
            f"loss {r.get('loss', float('nan')):+.4f}  {extra}grad {r['grad_norm']:.3f}  "
            f"{r['samples_per_s']:.1f} samples/s  peak {r['peak_mem_mb']:.0f} MB"
            + (f"  skipped {r['skipped_steps']}" if r["skipped_steps"] else "")
        )

    def save_guard(self, state) -> None:
        """Write guard.json: the guard's state (``guard.GuardState``: best evaluation, falls in a row, why it stopped) and
        every guard evaluation's figures, the one before training (epoch 0) included; redraw the curves."""
        (self.run_dir / "guard.json").write_text(json.dumps(state.to_dict(), indent=1))
        self.plot_rewards()

    def plot_rewards(self) -> None:
        """reward_curve.png: the training reward (mean ± its standard error std / sqrt(n), which stays inside the reward's
        range where mean ± std would not), and where the guard runs, beside it the held-out reward (± standard error) and
        the training reward on the guard's fixed batch, the within-prompt diversity and the drift from the base model,
        the best held-out evaluation and the guard's stop marked: training reward up while the held-out reward turns
        down is the picture of reward hacking."""
        # matplotlib's object API, not pyplot: pyplot keeps global state that grows a little with every
        # figure, which a run that redraws its curve every epoch for hours would notice
        Figure = require("matplotlib.figure", "the reward curve (reward_curve.png)").Figure

        recs = self.records()
        guard_path = self.run_dir / "guard.json"
        guard = json.loads(guard_path.read_text()) if guard_path.exists() else None
        if not recs and not guard:
            return
        x = [r["epoch"] for r in recs]
        m = [r["reward_mean"] for r in recs]
        se = [r["reward_std"] / math.sqrt(max(r.get("samples", 1), 1)) for r in recs]
        hist = (guard or {}).get("history", [])
        panels = [k for k in ("guard_heldout", "guard_diversity", "guard_drift") if any(k in h for h in hist)]
        fig = Figure(figsize=(5 + 3.2 * len(panels), 3.2))
        axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
        ax = axes[0]
        ax.plot(x, m, marker="o", ms=3, label="training batch")
        ax.fill_between(x, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)], alpha=0.2)
        gx = [h["epoch"] for h in hist if "guard_reward" in h]
        if gx:
            ax.plot(gx, [h["guard_reward"] for h in hist if "guard_reward" in h], marker="s", ms=3, label="guard's fixed batch")
            ax.legend(fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"reward ({reward_label(self.cfg)})")
        ax.set_title(f"{self.cfg.name}: {self.cfg.algo}", fontsize=9)
        titles = {"guard_heldout": "held-out reward (guard)", "guard_diversity": "within-prompt diversity", "guard_drift": "drift: mean step KL to base"}
        for ax, key in zip(axes[1:], panels):
            pts = [h for h in hist if key in h]
            ex, ey = [h["epoch"] for h in pts], [h[key] for h in pts]
            ax.plot(ex, ey, marker="o", ms=3, color="tab:red" if key == "guard_heldout" else "tab:green" if key == "guard_diversity" else "tab:purple")
            if key == "guard_heldout":
                es = [h.get("guard_heldout_se", 0.0) for h in pts]
                ax.fill_between(ex, [a - b for a, b in zip(ey, es)], [a + b for a, b in zip(ey, es)], alpha=0.2, color="tab:red")
                if guard.get("best_epoch") is not None:
                    ax.axvline(guard["best_epoch"], color="black", ls=":", lw=1, label=f"best (epoch {guard['best_epoch']})")
                    ax.legend(fontsize=7)
            if guard.get("stopped_epoch") is not None:
                ax.axvline(guard["stopped_epoch"], color="tab:red", ls="--", lw=1)
            ax.set_xlabel("epoch")
            ax.set_title(titles[key], fontsize=9)
        fig.tight_layout()
        fig.savefig(self.run_dir / "reward_curve.png", dpi=110)

    def save_eval(self, tag: str, rewards: torch.Tensor, images: torch.Tensor, captions: Optional[list[dict]] = None,
                  step: int = 0, metrics: Optional[dict[str, torch.Tensor]] = None) -> dict:
        """Write eval_<tag>.json (the rewards of the fixed seeds, their mean and std; the reward's per-sample
        ``metrics`` with their mean and standard error std / sqrt(n)) and grid_<tag>.png of ``images``: with
        ``captions`` (one per image, see ``labelled_grid``) each image is labelled with its prompt and reward, and the
        grid also goes to TensorBoard and W&B as grid_<tag> at ``step``."""
        stats = {"n": int(rewards.numel()), "mean": float(rewards.mean()), "std": float(rewards.std(unbiased=False)),
                 "rewards": [round(float(r), 6) for r in rewards]}
        if metrics:
            stats["metrics"] = {k: {"mean": float(v.mean()), "se": float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan"),
                                    "values": [round(float(x), 6) for x in v]} for k, v in metrics.items()}
        (self.run_dir / f"eval_{tag}.json").write_text(json.dumps(stats))
        if images.numel() and captions is not None:
            verdict = caption_summary(captions)
            title = (f"{tag} training: {reward_label(self.cfg)}\nmean {stats['mean']:+.4f} over {stats['n']} fixed seeds"
                     + (f"\nthis grid: {verdict}" if verdict else ""))
            grid = labelled_grid(images, captions, title=title)
            grid.save(self.run_dir / f"grid_{tag}.png")
            self.log_grid(f"grid_{tag}", grid, step, title)
        elif images.numel():
            image_grid(images, self.run_dir / f"grid_{tag}.png", scale=4 if images.shape[-1] <= 32 else 1)
        if self.wandb is not None:
            self.wandb.summary.update({f"eval_{tag}_mean": stats["mean"], f"eval_{tag}_std": stats["std"]})
        return stats

    def load_eval(self, tag: str) -> Optional[dict]:
        path = self.run_dir / f"eval_{tag}.json"
        return json.loads(path.read_text()) if path.exists() else None


# model family -> (the diffusers pipeline whose LoRA format the adapter is saved in, its layers argument)
LORA_SAVERS = {"sd": ("StableDiffusionPipeline", "unet_lora_layers"), "sdxl": ("StableDiffusionXLPipeline", "unet_lora_layers"),
               "sd3": ("StableDiffusion3Pipeline", "transformer_lora_layers"), "flux": ("FluxPipeline", "transformer_lora_layers"),
               "wan": ("WanPipeline", "transformer_lora_layers"), "qwen_image": ("QwenImagePipeline", "transformer_lora_layers"),
               "z_image": ("ZImagePipeline", "transformer_lora_layers"), "flux2": ("Flux2KleinPipeline", "transformer_lora_layers")}


def save_final_weights(model, run_dir: Path, state_dict: Optional[dict] = None) -> Path:
    """LoRA: diffusers' LoRA format (``pipeline.load_lora_weights(run_dir / "lora")`` reads it): a UNet's in the
    older diffusers naming, a transformer's in peft's naming, as diffusers' own LoRA training scripts save them.
    Full fine-tuning: the denoiser with ``save_pretrained`` (safetensors). ``state_dict``: the denoiser's
    whole weights when its modules hold shards (FSDP), else they are read from the modules."""
    run_dir = Path(run_dir)
    if model.lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(model.denoiser, state_dict=state_dict)
        out = run_dir / "lora"
        out.mkdir(parents=True, exist_ok=True)
        family = getattr(model, "lora_family", model.kind)  # the flow-digits world saves as SD3's transformer
        import diffusers

        pipeline, key = LORA_SAVERS.get(family, LORA_SAVERS["sd"])
        if key == "unet_lora_layers":
            # UNets in the older diffusers naming (lora.down / lora.up), as diffusers' SD LoRA scripts save them;
            # transformers keep peft's names (lora_A / lora_B): the conversion knows only the attention projections'
            # names, and a LoRA that also adapts other modules (FLUX.2's single blocks) would come out half converted
            layers = convert_state_dict_to_diffusers(layers)
        getattr(diffusers, pipeline).save_lora_weights(out, **{key: layers})
        return out
    out = run_dir / "denoiser"
    if state_dict is None:
        model.denoiser.save_pretrained(out, safe_serialization=True)
    else:  # the same folder layout as save_pretrained: config.json + diffusion_pytorch_model*.safetensors
        from huggingface_hub import save_torch_state_dict

        out.mkdir(parents=True, exist_ok=True)
        model.denoiser.save_config(out)
        save_torch_state_dict(state_dict, out, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
    return out


def paired_change(before: dict, after: dict) -> tuple[float, float]:
    """Mean change of the reward over the same seeds and its standard error (paired samples):
    d_i = after_i - before_i, mean(d) and std(d) / sqrt(n)."""
    d = torch.tensor(after["rewards"]) - torch.tensor(before["rewards"])
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")
    return float(d.mean()), se


def _paired_change(before: dict, after: dict) -> str:
    mean, se = paired_change(before, after)
    return f"Change: {mean:+.4f} ± {se:.4f} (mean of the per-seed differences ± its standard error)."


def guard_lines(state) -> list[str]:
    """summary.md's guard section: why the run stopped (or that it did not), the best held-out evaluation and its
    checkpoint, and every held-out reward that was unavailable."""
    lines = ["", "## Guard", ""]
    if state.stopped:
        lines.append(f"- **Stopped by the guard after epoch {state.stopped_epoch}**: {state.stopped}.")
    else:
        lines.append("- The guard did not stop the run.")
    if state.best_epoch is not None:
        where = "checkpoints/best/" + (" (the base model)" if state.best_epoch == 0 else "")
        reward = "" if state.best_reward is None else f", training reward {state.best_reward:+.4f}"
        lines.append(f"- Best held-out reward {state.best:+.4f} at epoch {state.best_epoch}{reward}: {where}.")
    for label, err in state.unavailable.items():
        lines.append(f"- Held-out reward `{label}` **unavailable** (last error: {err}).")
    if getattr(state, "diversity_space", None):
        lines.append(f"- Diversity: mean pairwise distance within a prompt's images, in {state.diversity_space}"
                     + (" (L2 per pixel)." if state.diversity_space == "pixels" else " (cosine distance of the embeddings)."))
    rows = [h for h in state.history]
    if rows:
        keys = [k for k in ("guard_heldout", "guard_reward", "guard_diversity", "guard_drift") if any(k in h for h in rows)]
        lines += ["", "| epoch | " + " | ".join(keys) + " |", "| --- | " + " | ".join("---" for _ in keys) + " |"]
        for h in rows:
            lines.append(f"| {h['epoch']} | " + " | ".join(f"{h[k]:+.4f}" if k in h else "—" for k in keys) + " |")
    return lines


def write_summary(run_dir: Path, cfg, records: list[dict], before: Optional[dict], after: Optional[dict],
                  weights: Path, wall_s: float, guard=None) -> dict:
    run_dir = Path(run_dir)
    train_time = sum(r["sample_time_s"] + r["train_time_s"] for r in records)
    def brief(e):
        if e is None:
            return None
        out = {k: v for k, v in e.items() if k not in ("rewards", "metrics")}
        out.update({k: {"mean": m["mean"], "se": m["se"]} for k, m in e.get("metrics", {}).items()})
        return out

    summary = {"name": cfg.name, "algo": cfg.algo, "model": cfg.model.path, "reward": cfg.reward.name,
               "epochs": len(records), "samples": sum(r["samples"] for r in records), "training_wall_s": round(train_time, 1),
               "wall_s": round(wall_s, 1), "before": brief(before), "after": brief(after), "weights": str(weights)}
    lines = [f"# {cfg.name}", "",
             f"- algorithm: `{cfg.algo}`, model: `{cfg.model.path}` ({'LoRA r=' + str(cfg.model.lora_rank) if cfg.model.lora else 'full fine-tuning'}), reward: `{reward_label(cfg)}`",
             f"- {len(records)} epochs, {summary['samples']} trajectories of {cfg.sample.num_steps} steps, "
             f"training wall time {train_time:.1f} s (sampling + training; {wall_s:.1f} s with evaluation)"]
    if before and after:
        lines += ["", f"Reward over the same {before['n']} fixed-seed samples:", "",
                  "| | mean | std |", "| --- | --- | --- |",
                  f"| before | {before['mean']:+.4f} | {before['std']:.4f} |",
                  f"| after | {after['mean']:+.4f} | {after['std']:.4f} |",
                  "", _paired_change(before, after)]
        shared = [k for k in before.get("metrics", {}) if k in after.get("metrics", {})]
        if shared:
            lines += ["", "The reward's metrics over the same samples (mean ± standard error; the change is paired per seed):", "",
                      "| metric | before | after | change |", "| --- | --- | --- | --- |"]
            for k in shared:
                b, a = before["metrics"][k], after["metrics"][k]
                d, se = paired_change({"rewards": b["values"]}, {"rewards": a["values"]})
                lines.append(f"| {k} | {b['mean']:.3f} ± {b['se']:.3f} | {a['mean']:.3f} ± {a['se']:.3f} | {d:+.3f} ± {se:.3f} |")
        lines += ["", "![before](grid_before.png) ![after](grid_after.png)", "", "![reward curve](reward_curve.png)"]
    if guard is not None:
        lines += guard_lines(guard)
        summary["guard"] = {"stopped": guard.stopped, "stopped_epoch": guard.stopped_epoch, "best_epoch": guard.best_epoch,
                            "best_heldout": guard.best, "best_train_reward": guard.best_reward, "unavailable": dict(guard.unavailable)}
    lines += ["", f"Weights: `{weights}`"]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
