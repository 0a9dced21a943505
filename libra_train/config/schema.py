"""The recipe schema: typed dataclasses that every recipe YAML is validated against.

A recipe is one flat YAML file whose sections map onto these dataclasses one to one (``model``, ``data``,
``libra``, ``lora``, ``train``, ``logging``). ``load_recipe`` merges the YAML and the command-line overrides
onto ``OmegaConf.structured(RecipeConfig)``, so an unknown key or a value of the wrong type fails before
anything is built, and returns instances of these classes. Semantic rules (allowed values, divisibility)
live in ``libra_train.config.validate``.

The ``libra`` section is a plain mapping on purpose: it holds the keyword arguments of the plug-in's
``LibraConfig`` (enabled, method, layers, ratio, select, merge, theta, query), which validates them itself;
this package must not import the plug-in (transformers) just to read a YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Allowed values of the string-valued choices, checked by ``validate``.
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEMPLATES = ("vicuna_v1", "chat_template")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("bf16", "fp16", "fp32")
WANDB_MODES = ("online", "offline", "disabled")

DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass
class ModelConfig:
    """What to fine-tune: a local HF checkpoint (``path``) or a tiny random model (``tiny``), exactly one.

    Attributes:
        path: local directory of a transformers checkpoint (no hub download at run time).
        tiny: keyword arguments of ``libra_train.models.build_tiny_llava`` (``{}`` = its defaults).
        family: ``llava`` | ``llava_next`` | ``qwen2_vl`` | ``qwen2_5_vl`` | ``qwen3_vl`` | ``llava_onevision``
            (the checkpoint's model_type); selects the model class (the plug-in finds the visual spans itself).
        attn_implementation: ``auto`` picks flash_attention_2 when CUDA and flash-attn are there, else sdpa.
        dtype: weight dtype at load time; ``auto`` follows ``train.precision``.
        freeze_vision_tower: keep the vision encoder frozen.
        train_projector: train the multimodal projector.
        train_llm: fully train the language model. Must be false with ``lora.enabled`` (the LLM's base
            weights are frozen then and only the adapters train).
    """

    path: str | None = None
    tiny: dict[str, Any] | None = None
    family: str = "llava"
    attn_implementation: str = "auto"
    dtype: str = "auto"
    freeze_vision_tower: bool = True
    train_projector: bool = True
    train_llm: bool = True


@dataclass
class DataConfig:
    """Training data in LLaVA's JSON conversation format (or the generated demo set).

    Attributes:
        train: LLaVA-format JSON/JSONL file of training conversations.
        eval: held-out file in the same format (optional).
        image_folder: directory the samples' ``image`` paths are relative to.
        template: ``vicuna_v1`` (LLaVA-1.5's conversation format) or ``chat_template`` (the processor's).
        max_length: token budget per sample, visual tokens included (before compression).
        skip_bad_samples: leave out bad samples (found by the pre-check, or failing to load during training,
            e.g. a damaged image) and count them, instead of failing with a message naming each.
        group_by_modality_length: batch image and text-only samples separately, by length (LLaVA's sampler).
        num_workers: DataLoader worker processes.
        num_proc: processes of the pre-check of a data file (None = one per 5,000 records, at most one per
            core; rank 0 runs it while the other ranks wait, then they load its result).
        cache_dir: where the normalised records and the pre-check are cached, keyed by data file and
            configuration, so that later starts and resumes skip them (None = ``<train.output_dir>/data_cache``;
            give a shared folder to reuse it across runs).
        demo: keyword arguments of ``libra_train.data.demo.generate_demo_data``; when set, the data is
            generated into ``<output_dir>/demo_data`` and ``train``/``eval``/``image_folder`` point there
            (setting them to anything else is an error: drop ``data.demo`` with ``~data.demo`` instead).
        eval_max_samples: evaluate on at most this many samples of ``eval`` (None = all).
    """

    train: str | None = None
    eval: str | None = None
    image_folder: str | None = None
    template: str = "vicuna_v1"
    max_length: int = 2048
    skip_bad_samples: bool = False
    group_by_modality_length: bool = True
    num_workers: int = 2
    num_proc: int | None = None
    cache_dir: str | None = None
    demo: dict[str, Any] | None = None
    eval_max_samples: int | None = None


def demo_data_paths(output_dir: str) -> dict[str, str]:
    """Where ``data.demo`` puts the generated set: the values it gives ``data.train``, ``data.eval`` and
    ``data.image_folder``."""
    root = f"{output_dir.rstrip('/')}/demo_data"
    return {"train": f"{root}/train.json", "eval": f"{root}/val.json", "image_folder": f"{root}/images"}


@dataclass
class LoraConfig:
    """Optional peft LoRA on the language model (LLaVA's ``finetune_lora.sh`` defaults).

    Attributes:
        enabled: wrap the LLM's linear layers in LoRA adapters.
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_regex: full-name regex of the modules to adapt; anchored to ``language_model`` so that the
            CLIP tower's ``q_proj``/``k_proj``/... are not matched.
        projector_lr: learning rate of the (fully trained) projector; None = ``train.lr``.
    """

    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_regex: str = DEFAULT_LORA_TARGETS
    projector_lr: float | None = None


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and the DeepSpeed config.

    Attributes:
        seed: seed of every RNG (data order, init of the tiny model, dropout).
        epochs: passes over the training data (may be fractional).
        max_steps: stop after this many optimizer steps (overrides ``epochs`` when set).
        micro_batch_size: samples per device per forward/backward.
        global_batch_size: samples per optimizer step over all devices; must be divisible by
            ``micro_batch_size * world_size`` (the quotient is the gradient accumulation).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the optimizer steps spent in linear warm-up.
        scheduler: ``cosine`` | ``linear`` | ``constant`` decay after warm-up.
        max_grad_norm: gradient clipping by global norm (DeepSpeed's ``gradient_clipping``; 0 = off).
        precision: ``bf16`` | ``fp16`` | ``fp32`` (DeepSpeed's bf16/fp16 switches).
        gradient_checkpointing: recompute activations in the backward pass.
        save_steps: save a checkpoint every this many optimizer steps (None = only at the end).
        save_total_limit: keep at most this many step checkpoints (None = all). A save needs disk room for one
            more while the new one is written: the oldest is deleted only once the new one is complete.
        eval_steps: evaluate every this many optimizer steps (None = only at the end, if ``data.eval``).
        output_dir: checkpoints, logs and the resolved recipe go here.
        resume: None | ``latest`` (the newest checkpoint in ``output_dir``) | a checkpoint directory. A fresh
            run (None) into an ``output_dir`` that holds checkpoints is refused unless ``overwrite_output_dir``.
        resume_allow_changes: recipe keys (or sections, e.g. ``libra``) a resume may change; any other difference
            from the checkpoint's recipe is refused (``[train.lr,train.max_steps]``).
        overwrite_output_dir: let a fresh run delete the checkpoints, ``latest`` and ``log.jsonl`` an earlier run
            left in ``output_dir``.
        deepspeed: ``zero2`` | ``zero3`` | ``zero3_offload`` (``recipes/deepspeed/<name>.json``) or a path
            to a DeepSpeed JSON whose ``"auto"`` values are filled from this recipe.
    """

    seed: int = 42
    epochs: float = 1
    max_steps: int | None = None
    micro_batch_size: int = 16
    global_batch_size: int = 128
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    save_steps: int | None = None
    save_total_limit: int | None = None
    eval_steps: int | None = None
    output_dir: str = "outputs/${recipe_name}"
    resume: str | None = None
    resume_allow_changes: list[str] = field(default_factory=list)
    overwrite_output_dir: bool = False
    deepspeed: str = "zero3"


@dataclass
class LoggingConfig:
    """Where metrics go: a JSONL file in ``output_dir`` always (unless off), wandb/TensorBoard optionally.

    Attributes:
        log_every: log every this many optimizer steps.
        jsonl: write ``<output_dir>/log.jsonl``.
        wandb: log to Weights & Biases.
        wandb_project: wandb project name.
        wandb_mode: ``offline`` (no network, sync later) | ``online`` | ``disabled``.
        tensorboard: write TensorBoard event files (needs the ``tensorboard`` extra).
        progress: show a tqdm progress bar on rank 0.
    """

    log_every: int = 1
    jsonl: bool = True
    wandb: bool = False
    wandb_project: str = "libra-train"
    wandb_mode: str = "offline"
    tensorboard: bool = False
    progress: bool = True


@dataclass
class RecipeConfig:
    """A whole recipe.

    Attributes:
        recipe_name: defaults to the recipe file's name without ``.yaml``; ``train.output_dir`` uses it.
        model, data, lora, train, logging: the typed sections above.
        libra: keyword arguments of the plug-in's ``LibraConfig`` (validated there, see the module doc).
        recipe_path: the file this recipe was loaded from (set by ``load_recipe``; used in messages only).
    """

    recipe_name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    libra: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    recipe_path: str | None = None

    def __post_init__(self) -> None:
        # OmegaConf resolves ${recipe_name} when a recipe is loaded; do the same for a RecipeConfig built
        # directly in Python (tests, notebooks) so output_dir never holds a literal interpolation.
        self.train.output_dir = self.train.output_dir.replace("${recipe_name}", self.recipe_name)
