"""LLaVA JSON conversations -> tokenized samples -> batches; the demo data set.

Typical use::

    ds = build_dataset("train.json", processor, image_folder="images", template="vicuna_v1", max_length=2048)
    sampler = LengthGroupedSampler(ds.modality_lengths, batch_size, world_size=ws, rank=rank, seed=seed)
    loader = DataLoader(ds, batch_size, sampler=sampler, collate_fn=Collator(processor.tokenizer.pad_token_id))
"""

from libra_train.data.collate import Collator, collate
from libra_train.data.dataset import BadSamplesError, SupervisedDataset, build_dataset
from libra_train.data.demo import (
    DemoPaths,
    answer_space,
    chance_accuracy,
    generate_demo_data,
    majority_accuracy,
)
from libra_train.data.encode import IGNORE_INDEX, Encoder
from libra_train.data.records import DataError, Record, load_records, normalize_record
from libra_train.data.sampler import LengthGroupedSampler
from libra_train.data.templates import TEMPLATES, VICUNA_SYSTEM, render

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "VICUNA_SYSTEM",
    "BadSamplesError",
    "Collator",
    "DataError",
    "DemoPaths",
    "Encoder",
    "LengthGroupedSampler",
    "Record",
    "SupervisedDataset",
    "answer_space",
    "build_dataset",
    "chance_accuracy",
    "collate",
    "generate_demo_data",
    "load_records",
    "majority_accuracy",
    "normalize_record",
    "render",
]
