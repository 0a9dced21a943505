"""Fine-tune a LLaVA-style model with Libra-Merging inside its LLM.

    deepspeed train.py recipe=demo                      # 1..N processes (the launcher adds --local_rank=N)
    deepspeed --num_gpus 2 train.py recipe=demo train.micro_batch_size=16
    python train.py recipe=demo train.max_steps=20      # one process, no launcher

`run` reads top to bottom: claim the output folder, setup (DeepSpeed config, model, data, optimizer, engine,
resume) -> train (libra_train.training.loop) -> save -> evaluate. `main` parses the command line, opens and
closes the process group, and hands errors and signals to a `Supervisor`: bad input (recipe, data, model path,
resume mismatch, full disk) is one paragraph instead of a traceback, an error on any rank ends every rank at
once, SIGTERM / Ctrl-C save a checkpoint at the next step boundary (train.resume=latest continues).
Recipes live in recipes/; any value can be overridden with key=value (see libra_train.config).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from libra_train.training.dist import set_launch_defaults

if TYPE_CHECKING:
    from libra_train.config import RecipeConfig
    from libra_train.training.dist import DistEnv
    from libra_train.training.supervise import Supervisor


def run(cfg: RecipeConfig, env: DistEnv, supervisor: Supervisor) -> int:
    """Train as the recipe says; returns the exit code (0, or 128 + signal after a stop at a step boundary)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from libra_train.config import deepspeed_config, offloads_optimizer
    from libra_train.training import (
        batches,
        checkpoint,
        evaluate,
        faults,
        loop,
        metrics,
        optim,
        resume,
        setup,
    )
    from libra_train.training.dist import on_main
    from libra_train.training.output_dir import claim_folder

    # -- setup --------------------------------------------------------------------------------------------------
    wall_start = time.perf_counter()
    lock, folder_notes = claim_folder(cfg, env)  # one run per folder; refuse to overwrite; clean up leftovers
    supervisor.on_exit(lock.release)  # however the run ends
    resume_from = on_main(lambda: checkpoint.resolve_resume(cfg))  # after claim_folder's clean-up
    changes = resume.check_recipe(cfg, resume_from) if resume_from is not None else {}
    libra = setup.libra_config(cfg)
    setup.seed_everything(cfg.train.seed)
    dtype = setup.PRECISION_DTYPES[cfg.train.precision]
    ds_config = deepspeed_config(cfg, env.world_size, setup.hidden_size(cfg))
    accumulation = ds_config["gradient_accumulation_steps"]
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    # ZeRO-3: transformers loads a checkpoint partitioned while this object is alive (keep the name). Not for
    # the tiny model: its sub-models would be partitioned mid-construction and fail to initialise; it is
    # small, and deepspeed.initialize partitions it.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage == 3 and cfg.model.path else None
    model, processor = setup.build_base_model(cfg)
    setup.check_libra_fits(model, libra)
    model = setup.prepare_model(model, cfg, libra)

    batches.prepare_demo_data(cfg, env)
    train_set = batches.load_split(cfg, cfg.data.train, processor, env)
    eval_set = batches.load_split(cfg, cfg.data.eval, processor, env) if cfg.data.eval else None
    data = batches.build_train_data(cfg, train_set, processor, env, accumulation)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * data.steps_per_epoch))

    t = cfg.train
    optimizer = optim.build_optimizer(
        model, t.lr, t.weight_decay, cfg.lora.projector_lr, cpu_adam=offloads_optimizer(ds_config)
    )
    scheduler = optim.build_scheduler(optimizer, t.scheduler, t.warmup_ratio, total_steps)
    intended = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    faults.arm_forward(engine.module)
    checkpoint.check_space(engine, cfg, "a checkpoint")  # fail now rather than after hours

    state = checkpoint.TrainState(
        world_size=env.world_size, micro_batch_size=t.micro_batch_size, accumulation=accumulation
    )
    structure = checkpoint.run_structure(engine, zero_stage, t.precision)  # recorded, and checked on resume
    history: list[dict] = []  # resumes with changed recipe values, carried into every later checkpoint
    if resume_from is not None:
        state, saved = checkpoint.restore(engine, resume_from, state, env, structure)
        resume.apply_current_schedule(optimizer, scheduler, intended)  # the new lr / schedule, if allowed
        history = saved.get("resumes", [])
        if changes:
            history.append({"step": state.step, "from": str(resume_from), "changes": changes})
    meta = {**structure, "resumes": history}

    logger = metrics.MetricsLogger(cfg, env.is_main, total_steps, start_step=state.step)
    for note in folder_notes:
        logger.print(note)
    logger.log({"step": state.step, "event": "start", "resumed_from": resume_from and str(resume_from),
                "changes": changes})  # fmt: skip
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
    if changes:
        logger.print(
            "changed on resume (train.resume_allow_changes): "
            + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
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

    def save(s: checkpoint.TrainState) -> Path:
        return checkpoint.save_checkpoint(engine, cfg, s, processor, libra, env, meta)

    last_saved = state.step if resume_from is not None else -1
    stop = None

    def on_step_end(s: checkpoint.TrainState) -> bool:
        """Evaluate / save when it is their turn; True stops the loop (a signal, agreed by every rank)."""
        nonlocal last_saved, stop
        faults.point("step_end", step=s.step)
        if s.step == total_steps:  # the end of the run evaluates and saves below
            return False
        stop = supervisor.stop_vote()
        if stop is None and eval_set is not None and t.eval_steps and s.step % t.eval_steps == 0:
            run_eval(s.step)
        if stop is not None or (t.save_steps and s.step % t.save_steps == 0):
            save(s)
            last_saved = s.step
        return stop is not None

    # -- train ----------------------------------------------------------------------------------------------
    stages = len(libra.layers) + 1 if libra.enabled else 0
    stats = loop.train(
        engine, data, state, total_steps, env, dtype, logger, cfg.logging.log_every, on_step_end, stages
    )
    if stop is not None:
        logger.close()
        if env.is_main:
            print(
                f"stopped at step {state.step} of {total_steps} ({stop.describe(env.world_size)}); checkpoint: "
                f"{Path(t.output_dir) / f'checkpoint-{state.step}'}; resume with train.resume=latest",
                flush=True,
            )
        return stop.exit_code

    # -- save and evaluate ----------------------------------------------------------------------------------
    final = Path(t.output_dir) / f"checkpoint-{state.step}"
    if last_saved != state.step:
        final = save(state)
    result = run_eval(state.step) if eval_set is not None else None
    if cfg.data.skip_bad_samples:  # a collective: every rank gathers the run-time skips
        logger.print(batches.skipped_summary(train_set, eval_set, True, data.skips.gathered()))
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
    return 0


def main(argv: list[str]) -> int:
    """Run ``train.py``: every error ends every rank, printed once (see libra_train.training.supervise)."""
    from libra_train.config import RecipeError, parse_cli

    try:
        recipe, overrides, local_rank = parse_cli(argv)
    except RecipeError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank has the same command line
            print(f"error: {exc}", file=sys.stderr)
        return 2
    set_launch_defaults(local_rank)  # before deepspeed is imported: accelerator, threads, single-process env

    from libra_train.config import load_recipe
    from libra_train.training import dist, setup
    from libra_train.training.supervise import Supervisor

    env = dist.init_distributed(local_rank)
    supervisor = Supervisor(env)
    supervisor.start()
    try:
        cfg = load_recipe(recipe, overrides, validators=[setup.libra_config], world_size=env.world_size)
        code = run(cfg, env, supervisor)
    except Exception as exc:
        code = supervisor.fail(exc)  # with several processes it does not return: every rank ends now
    supervisor.close()
    dist.cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
