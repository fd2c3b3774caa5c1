"""Several processes over gloo on CPU: DeepSpeed ZeRO-2 and ZeRO-3 with LoRA on a tiny SDXL, DDP and FSDP2 == one
process, FSDP2's sharded checkpoints resume exactly, TDPO-R's data-parallel critic, and a dead process (DDP, FSDP2).

Each case launches ``torchrun --nproc_per_node 2`` on tests/multiprocess/driver.py. DeepSpeed JIT-builds its CPU
Adam op once (cached in .cache/torch_extensions, about half a minute).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
TINY = ["sample.num_steps=3", "sample.batch_size=2", "sample.num_batches_per_epoch=1", "train.batch_size=2",
        "train.chunk_size=3", "log.eval_samples=2", "log.progress=false", "log.tensorboard=false", "log.grid_samples=0",
        "reward.name=jpeg_compressibility", "prompts=[a cat, a dog]", "model.lora=true", "model.lora_rank=2",
        "reward.overlap=false", "train.learning_rate=1e-3"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nproc, mode, out, *args, timeout=900):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(29500 + os.getpid() % 1000)]
           if nproc > 1 else [sys.executable])
    res = subprocess.run([*cmd, "-m", "tests.multiprocess.driver", mode, str(out), *args], env=ENV, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]


def _launch_deepspeed_nodes(mode, out, *args, timeout=900):
    """DeepSpeed's multi-node recipe (docs/scaling.md) with two single-process "nodes" on this machine: a two-host
    hostfile, and the deepspeed launcher started on each node with --no_ssh --node_rank N."""
    hostfile, port = Path(out).parent / "hostfile", _free_port()
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    procs = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "--module",
                               "tests.multiprocess.driver", mode, str(out), *args],
                              env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffrl_fast.models.tiny import cached_tiny_pipeline

    return cached_tiny_pipeline("sdxl", root=tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_resumes_and_keeps_ranks_identical(sdxl, tmp_path, stage):
    """One launch: ZeRO-`stage` trains 2 epochs (checkpoint), then a fresh trainer resumes from it to epoch 3.
    PyTorch's AdamW (torch_adam) instead of DeepSpeed's CPU Adam keeps the JIT build of that op out of CI;
    the sharding, checkpointing and resume under test are DeepSpeed's either way. ZeRO-3 launches with torchrun;
    ZeRO-2 with DeepSpeed's multi-node hostfile recipe, as two single-process nodes (local rank 0 on both)."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage, "contiguous_gradients": True},
                              "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    common = [f"model.path={sdxl}", *TINY, "dist.engine=deepspeed", f"dist.deepspeed_config={ds}", f"output_dir={tmp_path}", "name=run"]
    if stage == 2:
        ranks = _launch_deepspeed_nodes("train_resume", tmp_path / "a", *common, "num_epochs=3")
        assert [r["first"]["local_rank"] for r in ranks] == [0, 0]
    else:
        ranks = _launch(2, "train_resume", tmp_path / "a", *common, "num_epochs=3")
    first, resumed = [r["first"] for r in ranks], [r["resumed"] for r in ranks]
    assert first[0]["engine"] == "deepspeed" and first[0]["epoch"] == 2 and resumed[0]["epoch"] == 3
    assert first[0]["fingerprint"] == first[1]["fingerprint"]  # both ranks hold the same (gathered) weights
    assert resumed[0]["fingerprint"] == resumed[1]["fingerprint"] and resumed[0]["fingerprint"] != first[0]["fingerprint"]
    ckpt = tmp_path / "run" / "checkpoints"
    latest = ckpt / (ckpt / "latest").read_text().strip()
    assert (latest / "deepspeed").is_dir() and (latest / "weights.safetensors").exists()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward_mean"]])).all() for r in records)
    assert all(r["samples"] == 4 for r in records)  # 2 processes x 2 samples


@pytest.mark.slow
def test_ddp_update_equals_single_process_update(sdxl, tmp_path):
    """One optimiser step on the same global batch of 4: 1 process x 4 samples vs 2 processes x 2 (DDP)."""
    common = [f"model.path={sdxl}", *TINY, "train.timestep_fraction=1.0", f"output_dir={tmp_path}", "advantage.min_count=16"]
    single = _launch(1, "step", tmp_path / "one", *common, "train.batch_size=4", "sample.batch_size=4", "name=one")[0]
    pair = _launch(2, "step", tmp_path / "two", *common, "dist.engine=ddp", "name=two")
    assert pair[0]["weights"] == pair[1]["weights"]  # DDP keeps the replicas identical
    g1 = torch.cat([torch.tensor(v) for v in single["grads"].values()])
    g2 = torch.cat([torch.tensor(pair[0]["grads"][k]) for k in single["grads"]])
    assert g1.abs().max() > 0
    assert (g1 - g2).abs().max() / g1.abs().max() < 1e-4, (g1 - g2).abs().max() / g1.abs().max()


@pytest.mark.slow
def test_fsdp_update_equals_single_process_update(sdxl, tmp_path):
    """FSDP2, full fine-tuning (every UNet block its own unit) with activation checkpointing: one optimiser step on
    the global batch of 4 over 2 processes equals one process's; the gathered weights are the same on both ranks."""
    common = [f"model.path={sdxl}", *TINY, "model.lora=false", "train.timestep_fraction=1.0", f"output_dir={tmp_path}",
              "advantage.min_count=16"]
    single = _launch(1, "step", tmp_path / "one", *common, "train.batch_size=4", "sample.batch_size=4", "name=one")[0]
    # with the UNet's activation checkpointing inside the FSDP units: the same gradients
    pair = _launch(2, "step", tmp_path / "two", *common, "dist.engine=fsdp", "model.gradient_checkpointing=true", "name=two")
    assert pair[0]["weights"] == pair[1]["weights"]
    g1 = torch.cat([torch.tensor(v) for v in single["grads"].values()])
    g2 = torch.cat([torch.tensor(pair[0]["grads"][k]) for k in single["grads"]])
    assert g1.abs().max() > 0
    assert (g1 - g2).abs().max() / g1.abs().max() < 1e-4, (g1 - g2).abs().max() / g1.abs().max()
    # the same AdamW step on the sharded state: compared where the gradient is clearly non-zero (Adam moves a
    # weight by ~lr whatever |g|, so a sign flip of a vanishing gradient's summation noise would move it 2 lr)
    w1 = torch.cat([torch.tensor(v) for v in single["weights"].values()])
    w2 = torch.cat([torch.tensor(pair[0]["weights"][k]) for k in single["weights"]])
    first = torch.cat([torch.tensor(v)[:64] for v in single["grads"].values()])  # the weights' first 64 entries
    clear = first.abs() > 1e-3 * g1.abs().max()
    assert clear.sum() > 10 and (w1 - w2)[clear].abs().max() < 1e-5


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_with_cpu_offload_matches_one_bf16_process(sdxl, tmp_path):
    """FSDP2's MixedPrecisionPolicy (dist.fsdp_mixed_precision: bf16 all-gather and compute, fp32 reduction) with
    CPUOffloadPolicy (dist.fsdp_cpu_offload; unpinned without CUDA), LoRA: the blocks compute with bf16 weights,
    the shards and their gradients stay fp32 on the CPU, and the step's gradient is one bf16-autocast process's
    within bf16 rounding."""
    common = [f"model.path={sdxl}", *TINY, "train.timestep_fraction=1.0", f"output_dir={tmp_path}", "advantage.min_count=16",
              "model.mixed_precision=bf16"]
    single = _launch(1, "step", tmp_path / "one", *common, "train.batch_size=4", "sample.batch_size=4", "name=one")[0]
    pair = _launch(2, "step", tmp_path / "two", *common, "dist.engine=fsdp", "dist.fsdp_mixed_precision=true",
                   "dist.fsdp_cpu_offload=true", "name=two")
    assert single["compute_dtype"] == "torch.float32"  # autocast alone keeps fp32 weights, casting per op
    for rank in pair:
        assert rank["compute_dtype"] == "torch.bfloat16"
        assert rank["shard_devices"] == ["cpu"] and rank["shard_dtypes"] == ["torch.float32"]
        assert rank["grad_dtypes"] == ["torch.float32"]
    assert pair[0]["weights"] == pair[1]["weights"]
    g1 = torch.cat([torch.tensor(v) for v in single["grads"].values()])
    g2 = torch.cat([torch.tensor(pair[0]["grads"][k]) for k in single["grads"]])
    assert g1.abs().max() > 0
    rel = (g1 - g2).norm() / g1.norm()
    assert rel < 0.05, rel  # bf16 has 8 bits of mantissa: ~0.4% per rounding, accumulated over a tiny UNet
    assert torch.nn.functional.cosine_similarity(g1, g2, dim=0) > 0.999


@pytest.mark.slow
def test_fsdp_resumed_run_equals_an_uninterrupted_one(sdxl, tmp_path):
    """FSDP2 with LoRA: sharded (DCP) checkpoints; a run stopped after epoch 1 and resumed by a fresh trainer ends
    where an uninterrupted 2-epoch run ends, on both ranks."""
    ranks = _launch(2, "resume_equal", tmp_path / "out", f"model.path={sdxl}", *TINY, "dist.engine=fsdp", "num_epochs=2",
                    f"output_dir={tmp_path}")
    whole, resumed = [r["whole"] for r in ranks], [r["resumed"] for r in ranks]
    assert whole[0]["engine"] == "fsdp" and resumed[0]["epoch"] == 2
    assert whole[0]["fingerprint"] == whole[1]["fingerprint"] and resumed[0]["fingerprint"] == resumed[1]["fingerprint"]
    assert resumed[0]["fingerprint"] == pytest.approx(whole[0]["fingerprint"], rel=1e-6, abs=1e-9)
    ckpt = tmp_path / "part" / "checkpoints"
    latest = ckpt / (ckpt / "latest").read_text().strip()
    assert (latest / "fsdp" / ".metadata").is_file() and (latest / "weights.safetensors").is_file()
    read = lambda name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("reward_mean", "loss", "grad_norm")
    flat = lambda name: [r[k] for r in read(name) for k in keys]  # noqa: E731
    assert len(flat("whole")) == 6 and flat("whole") == pytest.approx(flat("part"), rel=1e-6, abs=1e-9)
    assert (tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_dead_process_stops_the_others_within_a_bounded_time(sdxl, tmp_path, engine):
    import time

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200),
           "-m", "tests.multiprocess.driver", "die", str(tmp_path / "out"), f"model.path={sdxl}", *TINY, f"dist.engine={engine}",
           "dist.timeout_s=60", "num_epochs=3", f"output_dir={tmp_path}", "name=die"]
    t0 = time.time()
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - t0
    assert res.returncode != 0 and elapsed < 200, (res.returncode, elapsed)
    assert re.search(r"exitcode\s*:\s*3", res.stderr), res.stderr[-3000:]  # the launcher reports the rank that died
    records = (tmp_path / "die" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1, records  # epoch 1 trained on both processes; nothing after the death in epoch 2


@pytest.mark.slow
def test_tdpo_critic_is_identical_on_every_rank(tmp_path):
    """The critic is data-parallel (gradients averaged before each step, resets decided on all ranks' rows and
    drawn from a shared stream), as accelerate makes it in the reference: both ranks end with the same critic."""
    args = ["algo=tdpo_r", "tdpo.reset_every=1", "num_epochs=2", "sample.num_steps=4", "sample.batch_size=4",
            "sample.num_batches_per_epoch=1", "train.batch_size=4", "log.eval_samples=0", "log.progress=false",
            "log.tensorboard=false", "reward.overlap=false", "dist.engine=ddp", f"output_dir={tmp_path}", "name=critic"]
    ranks = _launch(2, "critic", tmp_path / "out", *args)
    assert ranks[0]["moved"] > 0 and ranks[0]["critic"] == ranks[1]["critic"]
    assert [r.get("critic_reset_neurons", 0) > 0 for r in ranks[0]["records"]] == [True, True]  # reset after each epoch


@pytest.mark.slow
def test_two_node_rendezvous(sdxl, tmp_path):
    """The multi-node recipe of docs/scaling.md with two single-process "nodes" on this machine: two torchrun
    launchers, --nnodes 2, c10d rendezvous. Both processes have local rank 0 and global ranks 0 and 1; only
    rank 0 writes the run folder; the replicas end identical. (DeepSpeed's hostfile recipe runs in the ZeRO-2 test.)"""
    port = _free_port()
    args = [f"model.path={sdxl}", *TINY, "dist.engine=ddp", "num_epochs=1", f"output_dir={tmp_path}", "name=nodes"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "nodes",
                               # one machine plays both nodes: say which launcher hosts the rendezvous store, and
                               # publish 127.0.0.1 rather than the host name as the master address
                               "--rdzv_conf", f"is_host={int(node == 0)}", "--local_addr", "127.0.0.1",
                               "-m", "tests.multiprocess.driver", "train", str(tmp_path / "out"), *args],
                              env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["local_rank"] for r in ranks] == [0, 0] and [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert len((tmp_path / "nodes" / "metrics.jsonl").read_text().splitlines()) == 1
