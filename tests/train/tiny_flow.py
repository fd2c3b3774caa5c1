"""The one-epoch LoRA run that trains each tiny 64-pixel flow-image pipeline (Qwen-Image, Z-Image, FLUX.2) in the
family tests: the run's settings, and each algorithm's (grpo with guidance 4, nft and awm without)."""

TINY = ["reward.name=jpeg_compressibility", "prompts=[a cat, a red dog]", "sample.num_steps=3", "sample.batch_size=4",
        "sample.height=64", "sample.width=64", "sample.num_batches_per_epoch=1", "train.batch_size=4", "train.chunk_size=3",
        "log.eval_samples=2", "log.grid_samples=2", "log.progress=false", "log.tensorboard=false", "reward.overlap=false",
        "num_epochs=1", "train.learning_rate=1e-3", "model.lora=true"]
ALGOS = {"grpo": ["grpo.group_size=2", "sample.guidance_scale=4.0"],
         "nft": ["nft.group_size=2", "sample.guidance_scale=1.0"],
         "awm": ["awm.group_size=2", "awm.train_timesteps=2", "sample.guidance_scale=1.0"]}
