"""The pre-check of a data file: once per file and configuration, in parallel, cached on disk.

At LLaVA's scale (llava_v1_5_mix665k: 665k conversations) checking every sample before the first step (image
headers, rendering, tokenization, truncation, labels) is minutes of CPU; doing it again on every start, resume
and rank would cost that each time. So:

* `load_cached_records` reads the JSON once and keeps the normalised records as an Arrow dataset on disk
  (``datasets.save_to_disk``); later starts memory-map it (no JSON parsing, little resident memory, pages
  shared by all processes of a node).
* `precheck` runs `Encoder.check_batch` over the records with ``datasets.Dataset.map`` (``num_proc`` worker
  processes, batches of `BATCH_SIZE` records per tokenizer call) and keeps, per row, the length after
  truncation (-1 for a bad row), the reason code and the message. Every problem of the file is there, so the
  caller still reports all of them at once, naming each sample.

Cache layout, ``<cache_dir>/<file key>/``: ``records/`` and ``check-<config key>/`` (datasets directories).
The file key hashes the data file's resolved path, size and modification time; the config key hashes
everything the check depends on: template, max_length, square padding, the image folder, the tokenizer (its
full ``tokenizer.json``), the processor's settings, and `CACHE_VERSION` (bumped when the check's output
changes). Entries are written under a temporary name and renamed, so a run killed half-way leaves no partial
entry and two writers of the same key cannot corrupt it. The image files themselves are not part of the key:
after replacing images in place, delete the cache folder (or ``touch`` the data file). A sample whose image
breaks later still fails or is skipped at load time (`SupervisedDataset`).

Ranks share the cache: the training loop lets rank 0 build it while the others wait, then they load it
(``libra_train.training.batches.load_split``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from libra_train.data.encode import Encoder
from libra_train.data.records import DataError, load_records, row_to_record

logger = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: records carry question_types; 3: and videos
BATCH_SIZE = 256  # records per tokenizer call: amortises the Python overhead, keeps worker memory small
MIN_RECORDS_PER_PROC = 5_000  # below this a worker process costs more to start than it saves
PROGRESS_FROM = 10_000  # records from which the pre-check shows a progress bar
CHECK_FEATURES = datasets.Features(
    {"length": datasets.Value("int64"), "reason": datasets.Value("string"), "error": datasets.Value("string")}
)


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask: a container's or a launcher's binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_num_proc(n_records: int, num_proc: int | None) -> int:
    """``num_proc`` if given, else one process per `MIN_RECORDS_PER_PROC` records, at most one per core."""
    if num_proc is not None:
        return max(1, num_proc)
    return max(1, min(available_cores(), n_records // MIN_RECORDS_PER_PROC))


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def file_key(path: str | os.PathLike) -> str:
    """Identifies a data file's content cheaply: resolved path, size, modification time (ns)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _digest("records", CACHE_VERSION, path, stat.st_size, stat.st_mtime_ns)


def _processor_settings(processor: Any) -> str:
    """The processor's configuration as text (image processor, patch size, token counts...), tokenizer aside."""
    if processor is getattr(processor, "tokenizer", processor):
        return type(processor).__name__
    try:
        return processor.to_json_string()
    except Exception:  # noqa: BLE001 (processors that cannot serialise themselves: fall back to their fields)
        fields = {k: v for k, v in vars(processor).items() if k not in ("tokenizer", "chat_template")}
        return type(processor).__name__ + repr(sorted((k, repr(v)) for k, v in fields.items()))


def config_key(encoder: Encoder) -> str:
    """Identifies everything `Encoder.check_batch` depends on besides the records (see the module doc)."""
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokens = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    folder = Path(encoder.image_folder).resolve() if encoder.image_folder is not None else None
    template = getattr(encoder.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    return _digest(
        "check",
        CACHE_VERSION,
        encoder.template,
        encoder.max_length,
        encoder.pad_to_square,
        folder,
        type(tokenizer).__name__,
        tokens,
        template if encoder.template == "chat_template" else "",
        _processor_settings(encoder.processor),
    )


@contextlib.contextmanager
def _quiet(n_rows: int) -> Iterator[None]:
    """datasets' progress bars off for small datasets (tests, the demo), restored afterwards."""
    was_off = datasets.are_progress_bars_disabled()
    if n_rows < PROGRESS_FROM:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _publish(dataset: datasets.Dataset, final: Path) -> datasets.Dataset:
    """Save `dataset` to `final` atomically (temporary sibling, then rename) and return it memory-mapped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        with _quiet(len(dataset)):
            dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, final)
        except OSError:  # another process published the same entry first: keep theirs (same content)
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(final))


def entry_dir(cache_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The cache folder of one data file (its current content)."""
    return Path(cache_dir) / file_key(path)


def load_cached_records(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None, purpose: str = "training"
) -> datasets.Dataset:
    """`load_records`, through the cache when `cache_dir` is given (memory-mapped when it was there)."""
    if cache_dir is None:
        return load_records(path, purpose)
    if not Path(path).is_file():
        return load_records(path, purpose)  # its FileNotFoundError says what to do
    final = entry_dir(cache_dir, path) / "records"
    if final.is_dir():
        return datasets.load_from_disk(str(final))
    start = time.perf_counter()
    records = load_records(path, purpose)
    logger.info("%s: %d records read in %.1f s", path, len(records), time.perf_counter() - start)
    return _publish(records, final)


def _check_rows(batch: dict[str, list], encoder: Encoder, source: str) -> dict[str, list]:
    """`datasets.map` function: the check of a batch of rows (rows that failed to load keep their problem)."""
    n = len(batch["id"])
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    good = [i for i, row in enumerate(rows) if not row["reason"]]
    results = encoder.check_batch([row_to_record(rows[i], source) for i in good])
    out: dict[str, list] = {
        "length": [-1] * n,
        "reason": list(batch["reason"]),
        "error": list(batch["error"]),
    }
    for i, result in zip(good, results):
        if isinstance(result, DataError):
            out["reason"][i], out["error"][i] = result.reason, str(result)
        else:
            out["length"][i] = result
    return out


def _check_here(records: datasets.Dataset, encoder: Encoder, source: str) -> datasets.Dataset:
    """The pre-check in this process (small files: no worker start-up), into memory."""
    parts = []
    quiet = len(records) < PROGRESS_FROM
    with tqdm(total=len(records), desc="pre-check", unit="sample", disable=quiet) as bar:
        for lo in range(0, len(records), BATCH_SIZE):
            parts.append(_check_rows(records[lo : lo + BATCH_SIZE], encoder, source))
            bar.update(len(parts[-1]["length"]))
    columns = {k: [x for part in parts for x in part[k]] for k in CHECK_FEATURES}
    return datasets.Dataset.from_dict(columns, features=CHECK_FEATURES)


def _check_parallel(
    records: datasets.Dataset, encoder: Encoder, source: str, procs: int, folder: str
) -> datasets.Dataset:
    """The pre-check with ``datasets.map`` over `procs` worker processes, written into `folder`."""
    return records.map(
        _check_rows,
        fn_kwargs={"encoder": encoder, "source": source},
        batched=True,
        batch_size=BATCH_SIZE,
        num_proc=procs,
        remove_columns=records.column_names,
        features=CHECK_FEATURES,
        cache_file_name=os.path.join(folder, "check.arrow"),
        new_fingerprint=_digest("precheck", time.time_ns(), os.getpid()),  # datasets' cache is not used
        desc="pre-check",  # datasets adds "(num_proc=N)"
    )


def precheck(
    records: datasets.Dataset,
    encoder: Encoder,
    *,
    source: str = "",
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Check every row of `records` (from `load_cached_records`); cached under `cache_dir` when given.

    Args:
        records: the file's records.
        encoder: what the samples are checked for (processor, template, max length, image folder).
        source: the data file (messages name it; with `cache_dir` it also locates the cache entry).
        cache_dir: cache root (see the module doc); None computes without caching.
        num_proc: worker processes; None = `auto_num_proc`.

    Returns:
        A dataset aligned with `records`: ``length`` (after truncation, -1 for a bad row), ``reason`` and
        ``error`` (empty for a good row).
    """
    final = entry_dir(cache_dir, source) / f"check-{config_key(encoder)}" if cache_dir is not None else None
    if final is not None and final.is_dir():
        return datasets.load_from_disk(str(final))
    procs = auto_num_proc(len(records), num_proc)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="libra-precheck-") as tmp:
        checks = (
            _check_here(records, encoder, source)
            if procs == 1
            else _check_parallel(records, encoder, source, procs, tmp)
        )
        seconds = time.perf_counter() - start
        if final is not None:
            checks = _publish(checks, final)
            meta = {"source": str(source), "records": len(records), "num_proc": procs, "seconds": seconds}
            (final.parent / f"{final.name}.json").write_text(json.dumps(meta))
        elif procs > 1:  # out of the temporary folder, into memory
            checks = datasets.Dataset.from_dict(
                {k: checks[k] for k in CHECK_FEATURES}, features=CHECK_FEATURES
            )
    logger.info("%s: pre-check of %d records in %.1f s (%d processes)", source, len(records), seconds, procs)
    return checks
