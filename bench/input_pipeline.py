"""Images/s of the training input pipeline alone: threads against worker processes.

    python bench/input_pipeline.py [--size 256] [--batch 32] [--batches 12] [--rounds 3]

photo_crops (prepared on first use) read, resized to --size, randomly cropped and flipped
and collated into batches of --batch, by TrainIterator with data.num_threads threads
(the default path) or data.num_workers processes (whole batches per worker). Rounds are
interleaved; each round makes a fresh iterator, takes one batch from each worker
(start-up, reported apart: worker processes import the project and open the dataset)
and times --batches more. Prints the median images/s of each setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ldm_jax.data import TrainIterator, datasets, default_config

SETTINGS = {  # name: (num_threads, num_workers)
    "threads 0 (main thread)": (0, 0),
    "threads 2": (2, 0),
    "threads 8": (8, 0),
    "processes 2": (0, 2),
    "processes 4": (0, 4),
}


def one_round(cfg, batch: int, batches: int) -> tuple[float, float]:
    t = time.perf_counter()
    it = TrainIterator(cfg, global_batch_size=batch, seed=0, process_count=1)
    for _ in range(max(1, cfg.num_workers)):  # one batch from every worker: all started
        next(it)
    start = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t)
    it.close()
    return start, rate


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data_dir", default=None)
    args = p.parse_args()
    datasets.prepare("photo_crops", args.data_dir)
    results = {name: ([], []) for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (threads, workers) in SETTINGS.items():
            cfg = default_config(
                name="photo_crops", data_dir=args.data_dir, image_size=args.size,
                resize=args.size, crop="random", flip=True, num_threads=threads,
                num_workers=workers,
            )  # fmt: skip
            start, rate = one_round(cfg, args.batch, args.batches)
            results[name][0].append(start)
            results[name][1].append(rate)
    print(f"photo_crops at {args.size}², batch {args.batch}, {args.batches} batches x "
          f"{args.rounds} rounds (median)")  # fmt: skip
    for name, (starts, rates) in results.items():
        print(f"{name:>24}: {statistics.median(rates):7.1f} images/s  "
              f"(start-up {statistics.median(starts):5.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
