#!/usr/bin/env python
"""Start-up cost of the training data at LLaVA's scale: first start, later start, peak memory per rank.

    flock /tmp/libra-bench.lock python scripts/bench_startup.py                    # 665k records, 2 ranks
    python scripts/bench_startup.py --records 20000 --ranks 1 --num-proc 2          # a quick look

1. Generates (once, into ``--workdir``) a LLaVA-format JSON shaped like llava_v1_5_mix665k: ``--records``
   conversations of 1-4 rounds, about 10% text-only (ShareGPT-like, long answers, code blocks, unicode), the
   rest image samples in mix665k's styles (short VQA answers with "Answer the question using a single word or
   phrase.", LLaVA-Instruct conversations, detailed descriptions), over ``--images`` real JPEG files (random
   scenes of random sizes, reused) laid out like mix665k's image folder (coco/, gqa/, ocr_vqa/, textvqa/, vg/).
2. Starts ``--ranks`` processes (a gloo process group, as ``deepspeed train.py`` would) that each build the
   training data exactly as the training loop does (``libra_train.training.batches.load_split`` and
   ``build_train_data``: records, pre-check, length-grouped sampler and its first epoch order) with a
   llava-hf-style LLaVA-1.5 processor on the real Llama-2 tokenizer (tests/fixtures/llava15.py), first with an
   empty cache ("first start"), then again in fresh processes with the cache in place ("later start", what a
   resume or a second run pays).
3. Prints per rank the wall seconds, the CPU seconds (its own and its pre-check workers') and the peak resident
   memory (VmHWM of the rank; for its pre-check workers the largest ru_maxrss, which for a forked worker also
   counts the pages it shares with rank 0), the load average, and the pre-check's rate per
   CPU-second. CPU time does not grow when other jobs share the machine (wall time does), so the first start on
   N idle cores is projected as rank 0's own CPU time (reading the JSON, writing the cache: serial) plus its
   workers' CPU time / N (the pre-check: parallel); ``--json`` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE_DIRS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "this",
    "be",
    "from",
    "are",
    "or",
    "an",
    "have",
    "not",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "there",
    "can",
    "more",
    "if",
    "has",
    "their",
    "when",
    "what",
    "some",
    "would",
    "out",
    "so",
    "about",
    "up",
    "into",
    "them",
    "time",
    "only",
    "could",
    "person",
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "car",
    "bus",
    "train",
    "street",
    "table",
    "chair",
    "kitchen",
    "window",
    "building",
    "tree",
    "sky",
    "water",
    "plate",
    "pizza",
    "sandwich",
    "bowl",
    "cup",
    "bottle",
    "phone",
    "laptop",
    "book",
    "clock",
    "sign",
    "light",
    "road",
    "field",
    "grass",
    "snow",
    "beach",
    "wave",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "brown",
    "orange",
    "large",
    "small",
    "tall",
    "wooden",
    "metal",
    "old",
    "young",
    "standing",
    "sitting",
    "holding",
    "wearing",
    "looking",
    "walking",
    "riding",
    "playing",
    "eating",
    "parked",
    "near",
    "next",
    "behind",
    "front",
    "left",
    "right",
    "top",
    "side",
    "picture",
    "image",
    "scene",
    "background",
    "foreground",
    "appears",
    "shows",
    "several",
    "two",
    "three",
    "many",
    "group",
    "area",
    "view",
    "colour",
    "because",
    "however",
    "likely",
    "suggests",
    "possibly",
    "indicates",
    "typical",
    "enjoying",
    "outdoor",
    "indoor",
    "sunny",
    "cloudy",
    "busy",
]
CJK = "这张图片中有一个人正在街上骑自行车背景是高楼天空很蓝"
EXTRA = ("café", "naïve", "Zürich", "😀", "👍🏽", "—", "«", "»", "½", "ο καφές", "القهوة")
STYLES = (("vqa", 0.45), ("conversation", 0.30), ("detail", 0.15), ("text", 0.10))
SHORT_ANSWERS = ("Yes", "No", "2", "3", "1984", "Red", "Blue", "Left", "Kitchen", "Two people", "Stop sign")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    if rng.random() < 0.05:
        words.insert(rng.randrange(len(words)), rng.choice(EXTRA))
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, n_words: int) -> str:
    out, total = [], 0
    while total < n_words:
        s = _sentence(rng, 6, 20)
        out.append(s)
        total += s.count(" ") + 1
    return " ".join(out)


def _text_answer(rng: random.Random) -> str:
    if rng.random() < 0.3:
        body = "\n".join(f"    x{i} = x{i - 1} + {rng.randint(1, 9)}" for i in range(1, rng.randint(3, 12)))
        return f"{_paragraph(rng, 30)}\n\n```python\ndef f(x0):\n{body}\n    return x0\n```\n\n{_paragraph(rng, 20)}"
    if rng.random() < 0.1:
        return "".join(rng.choices(CJK, k=rng.randint(20, 80))) + "。"
    return "\n\n".join(_paragraph(rng, rng.randint(40, 120)) for _ in range(rng.randint(1, 3)))


def _record(rng: random.Random, i: int, images: list[str]) -> dict:
    style = rng.choices([s for s, _ in STYLES], weights=[w for _, w in STYLES])[0]
    rounds = rng.randint(1, 4) if style != "detail" else 1
    turns = []
    for r in range(rounds):
        if style == "vqa":
            q = _sentence(rng, 4, 12)[:-1] + "?\nAnswer the question using a single word or phrase."
            a = rng.choice(SHORT_ANSWERS)
        elif style == "conversation":
            q, a = _sentence(rng, 6, 18)[:-1] + "?", _paragraph(rng, rng.randint(20, 100))
        elif style == "detail":
            q, a = "Describe the following image in detail.", _paragraph(rng, rng.randint(80, 200))
        else:
            q, a = _paragraph(rng, rng.randint(8, 60))[:-1] + "?", _text_answer(rng)
        if r == 0 and style != "text":
            q = f"<image>\n{q}" if rng.random() < 0.8 else f"{q}\n<image>"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    record = {"id": f"{i:012d}" if style != "text" else f"sharegpt_{i:x}", "conversations": turns}
    if style != "text":
        record["image"] = rng.choice(images)
    return record


def generate(workdir: Path, n_records: int, n_images: int, seed: int = 0) -> Path:
    """Write ``mix665k_like_<n>.json`` and its images into `workdir` (skipped when already there)."""
    from PIL import Image, ImageDraw

    path = workdir / f"mix665k_like_{n_records}.json"
    if path.is_file():
        return path
    rng = random.Random(seed)
    images = []
    for k in range(n_images):
        rel = f"{IMAGE_DIRS[k % len(IMAGE_DIRS)]}/{k:012d}.jpg"
        full = workdir / "images" / rel
        if not full.is_file():
            full.parent.mkdir(parents=True, exist_ok=True)
            w, h = rng.randint(200, 640), rng.randint(200, 640)
            img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for _ in range(12):
                x, y = rng.randint(0, w - 20), rng.randint(0, h - 20)
                box = (x, y, x + rng.randint(10, w // 2), y + rng.randint(10, h // 2))
                draw.rectangle(box, fill=tuple(rng.randint(0, 255) for _ in range(3)))
            img.save(full, quality=90)
        images.append(rel)
    start = time.perf_counter()
    records = [_record(rng, i, images) for i in range(n_records)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    tmp.replace(path)
    size = path.stat().st_size / 2**20
    print(f"generated {path} ({n_records} records, {size:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    return path


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry a parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # not Linux


def _cpu_seconds() -> tuple[float, float]:
    """(user + system) CPU seconds of this process and of its finished children (the pre-check workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, data: Path, out: Path) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    import torch
    import torch.distributed as torch_dist

    from libra_train.config import RecipeConfig
    from libra_train.training import batches
    from libra_train.training.dist import DistEnv
    from tests.fixtures.llava15 import llava15_processor

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    processor = llava15_processor()
    cfg = RecipeConfig(recipe_name="bench_startup")
    d = cfg.data
    d.train, d.image_folder, d.max_length, d.num_workers = str(data), str(data.parent / "images"), 2048, 0
    d.cache_dir, d.num_proc, d.skip_bad_samples = str(args.cache_dir), args.num_proc, False
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 16, 16 * world
    env = DistEnv(rank, rank, world, torch.device("cpu"))
    base_rss = _peak_rss_mib()
    torch_dist.barrier()
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    dataset = batches.load_split(cfg, d.train, processor, env)
    loaded = time.perf_counter() - start
    train = batches.build_train_data(cfg, dataset, processor, env, accumulation=1)
    seconds = time.perf_counter() - start
    cpu_self, cpu_workers = (b - a for a, b in zip(cpu0, _cpu_seconds()))
    result = {
        "rank": rank,
        "seconds": seconds,
        "dataset_seconds": loaded,
        "samples": len(dataset),
        "steps_per_epoch": train.steps_per_epoch,
        "cpu_seconds": cpu_self,
        "worker_cpu_seconds": cpu_workers,
        "rss_before_mib": base_rss,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def run_phase(args: argparse.Namespace, data: Path) -> list[dict]:
    """All ranks once (fresh processes); their results in rank order."""
    import torch.multiprocessing as mp

    from libra_train.training.dist import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.ranks, free_port(), args, data, Path(tmp)), nprocs=args.ranks, join=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.ranks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--ranks", type=int, default=2, help="processes, as deepspeed --num_gpus would start")
    parser.add_argument(
        "--num-proc", type=int, default=None, help="pre-check workers (default: data.num_proc auto)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "libra-bench-startup")
    parser.add_argument("--later", type=int, default=1, help="later starts to time after the first")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.cache_dir = args.workdir / "cache"
    # In a child process: the generator holds every record in memory, which this process should not keep.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        data = pool.submit(generate, args.workdir, args.records, args.images).result()
    shutil.rmtree(args.cache_dir, ignore_errors=True)

    from libra_train.data.precheck import auto_num_proc, available_cores

    procs = auto_num_proc(args.records, args.num_proc)
    phases = {"first start": run_phase(args, data)}
    for k in range(args.later):
        phases[f"later start {k + 1}" if args.later > 1 else "later start"] = run_phase(args, data)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else ["?"] * 3
    print(f"\n{args.records} records ({data.stat().st_size / 2**20:.0f} MiB), {args.ranks} rank(s), "
          f"pre-check with {procs} process(es) on {available_cores()} core(s); load average {' '.join(load)}")  # fmt: skip
    print("| phase | rank | start-up (s) | CPU (s) | workers' CPU (s) | peak RSS (MiB) | RSS before (MiB) "
          "| peak worker RSS (MiB) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, ranks in phases.items():
        for r in ranks:
            print(f"| {name} | {r['rank']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                  f"{r['worker_cpu_seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} | "
                  f"{r['peak_worker_rss_mib']:.0f} |")  # fmt: skip
    # CPU time does not depend on how busy the machine is (wall time does): the first start's serial part is
    # rank 0's own CPU time (reading the JSON, writing the cache), its parallel part the workers' CPU time.
    first = phases["first start"][0]
    rate, projection = float("nan"), {}
    if procs > 1:  # the workers did the pre-check, rank 0 the rest
        serial, parallel = first["cpu_seconds"], first["worker_cpu_seconds"]
        rate = args.records / parallel
        projection = {n: serial + parallel / n for n in (2, 8)}
        print(f"pre-check: {rate:.0f} records per CPU-second; first start projected from CPU time on idle cores: "
              + ", ".join(f"{n} cores {t:.0f} s" for n, t in projection.items()))  # fmt: skip
    if args.json:
        result = {"records": args.records, "ranks": args.ranks, "num_proc": procs, "cores": available_cores(),
                  "loadavg": load, "records_per_cpu_second": rate, "projected_first_start_s": projection,
                  "phases": phases}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
