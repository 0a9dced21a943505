"""Fine-tune a LLaVA-style model with Libra-Merging inside its LLM.

    deepspeed train.py recipe=demo                      # 1..N processes (the launcher adds --local_rank=N)
    deepspeed --num_gpus 2 train.py recipe=demo train.micro_batch_size=16
    python train.py recipe=demo train.max_steps=20      # one process, no launcher

`run` reads top to bottom: setup (DeepSpeed config, model, data, optimizer, engine, resume) -> train
(libra_train.training.loop) -> save -> evaluate. `main` parses the command line, opens and closes the process
group, and turns bad input (recipe, data, model path) into a one-paragraph error instead of a traceback.
Recipes live in recipes/; any value can be overridden with key=value (see libra_train.config).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from libra_train.training.dist import set_launch_defaults

if TYPE_CHECKING:
    from libra_train.config import RecipeConfig
    from libra_train.training.dist import DistEnv


def run(cfg: RecipeConfig, env: DistEnv) -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from libra_train.config import deepspeed_config, offloads_optimizer
    from libra_train.training import batches, checkpoint, evaluate, loop, metrics, optim, setup

    # -- setup --------------------------------------------------------------------------------------------------
    wall_start = time.perf_counter()
    libra = setup.libra_config(cfg)
    setup.seed_everything(cfg.train.seed)
    dtype = setup.PRECISION_DTYPES[cfg.train.precision]
    ds_config = deepspeed_config(cfg, env.world_size, setup.hidden_size(cfg))
    accumulation = ds_config["gradient_accumulation_steps"]
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    # ZeRO-3: transformers loads a checkpoint partitioned while this object is alive (keep the name). Not for the
    # tiny model: its sub-models would be partitioned mid-construction and fail to initialise; it is small, and
    # deepspeed.initialize partitions it.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage == 3 and cfg.model.path else None
    model, processor = setup.build_base_model(cfg)
    model = setup.prepare_model(model, cfg, libra)

    batches.prepare_demo_data(cfg, env)
    train_set = batches.load_split(cfg, cfg.data.train, processor)
    eval_set = batches.load_split(cfg, cfg.data.eval, processor) if cfg.data.eval else None
    data = batches.build_train_data(cfg, train_set, processor, env, accumulation)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * data.steps_per_epoch))

    t = cfg.train
    optimizer = optim.build_optimizer(
        model, t.lr, t.weight_decay, cfg.lora.projector_lr, cpu_adam=offloads_optimizer(ds_config)
    )
    scheduler = optim.build_scheduler(optimizer, t.scheduler, t.warmup_ratio, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    state = checkpoint.TrainState(
        world_size=env.world_size, micro_batch_size=t.micro_batch_size, accumulation=accumulation
    )
    resume_from = checkpoint.resolve_resume(cfg)
    if resume_from is not None:
        state = checkpoint.restore(engine, resume_from, state, env)

    logger = metrics.MetricsLogger(cfg, env.is_main, total_steps, start_step=state.step)
    trainable, total = setup.count_parameters(engine.module)
    libra_note = f"Libra layers {libra.layers} ratio {libra.ratio}" if libra.enabled else "Libra off"
    logger.print(
        f"recipe {cfg.recipe_name}: {env.world_size} process(es), ZeRO-{zero_stage}, {t.precision}, "
        f"{total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable{', LoRA' if cfg.lora.enabled else ''}), "
        f"{libra_note}"
    )
    logger.print(
        f"data: {len(train_set)} train samples, {len(eval_set) if eval_set is not None else 0} eval; "
        + batches.skipped_summary(train_set, eval_set, cfg.data.skip_bad_samples)
    )
    logger.print(
        f"{total_steps} steps ({data.steps_per_epoch} per epoch), global batch {t.global_batch_size} = "
        f"{t.micro_batch_size} x {accumulation} accumulation x {env.world_size} process(es)"
        + (f"; resumed from {resume_from} at step {state.step}" if resume_from is not None else "")
    )

    shard = batches.eval_shard(len(eval_set), env, cfg.data.eval_max_samples) if eval_set is not None else []

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate.evaluate(
            engine.module, eval_set, shard, processor, t.micro_batch_size, env.device, dtype,
            synced_gpus=zero_stage == 3 and env.world_size > 1,
        )  # fmt: skip
        logger.log({"step": step, **result})
        logger.print(
            f"step {step}: eval loss {result['eval_loss']:.4f}, accuracy {100 * result['eval_accuracy']:.1f}% "
            f"({result['eval_samples']} samples{evaluate.format_per_type(result)})"
        )
        return result

    last_saved = state.step if resume_from is not None else -1

    def on_step_end(s: checkpoint.TrainState) -> None:
        nonlocal last_saved
        if s.step == total_steps:  # the end of the run evaluates and saves below
            return
        if eval_set is not None and t.eval_steps and s.step % t.eval_steps == 0:
            run_eval(s.step)
        if t.save_steps and s.step % t.save_steps == 0:
            checkpoint.save_checkpoint(engine, cfg, s, processor, libra, env)
            last_saved = s.step

    # -- train --------------------------------------------------------------------------------------------------
    stages = len(libra.layers) + 1 if libra.enabled else 0
    stats = loop.train(
        engine, data, state, total_steps, env, dtype, logger, cfg.logging.log_every, on_step_end, stages
    )

    # -- save and evaluate --------------------------------------------------------------------------------------
    final = Path(t.output_dir) / f"checkpoint-{state.step}"
    if last_saved != state.step:
        final = checkpoint.save_checkpoint(engine, cfg, state, processor, libra, env)
    result = run_eval(state.step) if eval_set is not None else None
    logger.close()
    if env.is_main:
        tokens_per_s = stats.tokens / stats.seconds if stats.seconds else float("nan")
        print(f"trained {stats.steps} steps in {stats.seconds:.1f} s ({tokens_per_s:.0f} tokens/s)", end="")
        print(f"; total wall time {time.perf_counter() - wall_start:.1f} s")
        if result is not None:
            accuracy = f"{100 * result['eval_accuracy']:.1f}% on {result['eval_samples']} samples"
            print(f"held-out accuracy: {accuracy}{batches.baseline_note(cfg)}")
        print(f"checkpoint: {final} (load with libra_train.training.load_trained_model)")
    del hf_ds_config


def main(argv: list[str]) -> int:
    from libra_train.config import RecipeError, parse_cli

    try:
        recipe, overrides, local_rank = parse_cli(argv)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    set_launch_defaults(local_rank)  # before deepspeed is imported: accelerator, threads, single-process env

    from libra_train.config import load_recipe
    from libra_train.data import BadSamplesError, DataError
    from libra_train.training import dist, setup

    env = dist.init_distributed(local_rank)
    try:
        cfg = load_recipe(recipe, overrides, validators=[setup.libra_config], world_size=env.world_size)
        run(cfg, env)
    except (RecipeError, BadSamplesError, DataError, FileNotFoundError) as exc:
        if env.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
