"""Run under torchrun (or as one process) by tests/multiprocess/test_distributed.py.

    python -m tests.multiprocess.driver train  OUT key=value ...   # Trainer.run(), then a fingerprint of the weights per rank
    python -m tests.multiprocess.driver train_resume OUT key=value ...  # train to num_epochs - 1, then resume to num_epochs
    python -m tests.multiprocess.driver resume_equal OUT key=value ...  # uninterrupted vs stopped-and-resumed, one launch
    python -m tests.multiprocess.driver step   OUT key=value ...   # one optimiser step on a fixed global batch (DDP vs 1 process)
    python -m tests.multiprocess.driver critic OUT key=value ...   # TDPO(-R) trains: its critic's parameters per rank
"""
import json
import sys
from pathlib import Path

import torch

from diffrl_fast.config_utils import load_config
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer


def weights(trainer) -> dict:
    if trainer.engine.kind == "fsdp":  # the whole weights on every rank, gathered shard by shard
        return {n: v.detach().double().clone() for n, v in trainer.engine.full_state(rank0_only=False).items()}
    with trainer.engine.gathered(), torch.no_grad():
        return {n: p.detach().double().clone() for n, p in trainer.model.denoiser.named_parameters() if p.requires_grad}


def fingerprint(trainer) -> dict:
    w = weights(trainer)
    return {"rank": trainer.ctx.rank, "local_rank": trainer.ctx.local_rank, "world": trainer.ctx.world_size,
            "engine": trainer.engine.kind, "epoch": trainer.epoch,
            "fingerprint": [float(v.sum()) for v in w.values()], "norm": float(sum(v.norm() ** 2 for v in w.values()) ** 0.5)}


def main() -> None:
    from diffrl_fast.cli import strip_launcher_args

    sys.argv[1:] = strip_launcher_args(sys.argv[1:])  # the deepspeed launcher's --local_rank=R, as the CLI does
    mode, out = sys.argv[1], Path(sys.argv[2])
    if any(a == "dist.engine=deepspeed" for a in sys.argv):
        # DeepSpeed JIT-builds a shared-memory allreduce for CPU processes (~40 s in CI); without it its collectives
        # go through gloo, which is what the test runs over anyway
        import importlib

        # (the module itself: ``deepspeed.comm.torch`` as an attribute is the torch package that deepspeed.comm imports)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if mode in ("resume_equal", "train_resume"):
        # train_resume: stop after num_epochs - 1, then a fresh Trainer resumes to num_epochs (one run folder);
        # resume_equal: the same as "part", beside an uninterrupted run "whole"
        args = sys.argv[3:] + (["name=part"] if mode == "resume_equal" else [])
        cfg = validate(load_config(Config, None, args))
        info = {}
        if mode == "resume_equal":
            whole = Trainer(validate(load_config(Config, None, [*sys.argv[3:], "name=whole"])), Path(cfg.output_dir) / "whole",
                            log_fn=lambda s: None)
            whole.run()
            info["whole"] = fingerprint(whole)
        first = Trainer(validate(load_config(Config, None, [*args, f"num_epochs={cfg.num_epochs - 1}"])),
                        Path(cfg.output_dir) / cfg.name, log_fn=lambda s: None)
        first.run()
        info["first"] = fingerprint(first)
        resumed = Trainer(cfg, Path(cfg.output_dir) / cfg.name, log_fn=lambda s: None)
        assert resumed.resume() and resumed.epoch == cfg.num_epochs - 1
        resumed.run()
        info["resumed"] = fingerprint(resumed)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{resumed.ctx.rank}.json").write_text(json.dumps(info))
        return
    cfg = validate(load_config(Config, None, sys.argv[3:]))
    trainer = Trainer(cfg, Path(cfg.output_dir) / cfg.name, log_fn=lambda s: None)
    rank = trainer.ctx.rank
    if mode == "die":  # the second process dies at the start of epoch 2; the launcher must stop the first
        sample = trainer.sample_epoch

        def sample_or_die(epoch, bar=None):
            if epoch == 1 and rank == 1:
                import os

                os._exit(3)
            return sample(epoch, bar)

        trainer.sample_epoch = sample_or_die
        trainer.run()
        return
    if mode == "critic":
        before = [p.detach().double().clone() for p in trainer.algo.critic.net.parameters()]
        trainer.run()
        after = [p.detach().double() for p in trainer.algo.critic.net.parameters()]
        info = {"rank": rank, "critic": [v.flatten().tolist() for v in after],
                "moved": max(float((a - b).abs().max()) for a, b in zip(after, before)),
                "records": [json.loads(x) for x in (Path(cfg.output_dir) / cfg.name / "metrics.jsonl").read_text().splitlines()]
                if rank == 0 else []}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(info))
        return
    if mode == "train":
        if "--resume" in sys.argv or (Path(cfg.output_dir) / cfg.name / "checkpoints").exists():
            trainer.resume()
        trainer.run()
        w = weights(trainer)
        info = {"rank": rank, "local_rank": trainer.ctx.local_rank, "world": trainer.ctx.world_size, "engine": trainer.engine.kind, "epoch": trainer.epoch,
                "fingerprint": [float(v.sum()) for v in w.values()], "norm": float(sum(v.norm() ** 2 for v in w.values()) ** 0.5)}
    else:  # one step on the same global batch of 4 trajectories, whatever the number of processes
        prompts, seeds = ["a cat", "a dog", "a cat", "a dog"], [11, 12, 13, 14]
        full = sample_trajectories(trainer.model, prompts, num_steps=cfg.sample.num_steps, guidance_scale=cfg.sample.guidance_scale,
                                   seeds=seeds, autocast_dtype=trainer.autocast_dtype)
        rewards = torch.tensor([0.5, -1.0, 2.0, 0.1])
        W = trainer.ctx.world_size
        n = len(prompts) // W
        mine = torch.arange(rank * n, (rank + 1) * n)
        traj = full.index(mine)
        data = trainer.algo.prepare(trainer.run_context, traj, rewards[mine])
        grads, seen = {}, {}  # seen: the dtypes a block's weights (during forward) and the gradients have
        step = trainer.engine.step

        def capture():  # the gradient the optimiser sees (after DDP's averaging), then the real step
            full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731 (FSDP's sharded grads)
            grads.update({n: full(p.grad).detach().double().clone() for n, p in trainer.model.denoiser.named_parameters()
                          if p.requires_grad and p.grad is not None})
            seen["grad_dtypes"] = sorted({str(p.grad.dtype) for p in trainer.model.denoiser.parameters() if p.grad is not None})
            return step()

        trainer.engine.step = capture  # the dtype a block's weights have while it computes (FSDP2's mixed precision casts its all-gather)
        # FSDP2's mixed precision casts a block's all-gathered weights for its forward
        probe = next(m for m in trainer.model.denoiser.modules() if isinstance(m, torch.nn.Linear))

        def record(module, args):  # a pre-hook's return value would replace the inputs: return None
            seen.setdefault("compute_dtype", str(module.weight.dtype))

        probe.register_forward_pre_hook(record)
        trainer.train_epoch(0, traj, data)
        w = weights(trainer)
        shards = [p for p in trainer.model.denoiser.parameters() if p.requires_grad]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in shards]
        info = {"rank": rank, "world": W, "weights": {k: v.flatten()[:64].tolist() for k, v in w.items()},
                "grads": {k: v.flatten().tolist() for k, v in grads.items()}, **seen,
                "shard_devices": sorted({str(p.device) for p in local}), "shard_dtypes": sorted({str(p.dtype) for p in local})}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
