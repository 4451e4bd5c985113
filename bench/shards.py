#!/usr/bin/env python
"""How much of the GPUs' time goes to useful work when extraction is split into shards?

An event simulation of ``count`` shards extracting one store, for two duration distributions:

- THUMOS-like: 413 videos, lognormal, median 2.6 min, about 24 h in all, a tail to ~30 min;
- ActivityNet-like: 15,000 videos, lognormal, mean ~2 min, cut to 5 s .. 10 min.

A video's encoding time is its duration times a per-video factor (lognormal, ``--noise``): the
plan knows durations, not how fast each video will decode and encode. A video longer than
``extract.shards.PART_SECONDS`` is planned in parts, as ``extract`` plans it; a part takes its
video's time divided by its parts, and the assembly of a split video (a copy of its features,
off the GPU's path) is not counted. Every shard walks its order of work items (videos and parts)
as ``extract`` does: an item already committed is skipped, so is the first unfinished item of
another shard's own share (``Shares.at_work``: its owner is on it), and one another shard is
encoding is skipped where claims work (``flock``) and encoded a second time where they do not
(object storage; the store then publishes one copy and the other is lost time). A shard stops
at the end of its order. Share = useful work / (shards x the time the last shard stops).

Schemes: ``every-Nth`` (the old split: sorted ids, every N-th whole video, nothing else),
``longest-first`` (the same shares as the plan, but no stealing), and the plan with stealing
(``extract.shards.work_order``, what ``extract`` runs) with and without working claims.
``plan, job array`` counts each shard's GPU until that shard stops (a job array's task gives
its GPU back; claims working). ``bound`` is the best any schedule of these work items can do
with every GPU held to the end: no shard can finish before the longest item, nor before its
share of the total. The last line is the smallest share of the plan (with or without claims,
every GPU held to the end) at the largest shard count, over both distributions.
``LOSA_TAL_PART_SECONDS`` (extract.shards.PART_SECONDS_ENV) tries another part length.

    python bench/shards.py [--shards 8,32,64] [--noise 0.15] [--seed 0]
"""
import argparse
import heapq
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extract.shards import (PART_SECONDS, PART_SECONDS_ENV, Shard, Shares,  # noqa: E402
                            item_video, part_count, parts_of, work_items, work_order)


def thumos_like(rng) -> np.ndarray:
    return np.minimum(rng.lognormal(np.log(2.6 * 60), 0.78, 413), 30 * 60)


def activitynet_like(rng) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(1.7 * 60), 0.55, 15000), 5, 10 * 60)


DISTRIBUTIONS = {"THUMOS-like": thumos_like, "ActivityNet-like": activitynet_like}


def simulate(orders: list, seconds: dict, claims: bool, shares=None) -> tuple:
    """Useful shares of ``len(orders)`` shards walking their orders (lists of ids): of their
    time until the last one stops (every GPU held to the end, as torchrun does) and of their
    time until each stops (a job array's task gives its GPU back). With ``shares``
    (``extract.shards.Shares``), a shard leaves alone what another owner is on."""
    count = len(orders)
    committed, running = set(), {}
    position = [0] * count
    events = [(0.0, shard, None) for shard in range(count)]  # (time, shard, video finished)
    stopped = [0.0] * count
    while events:
        now, shard, finished = heapq.heappop(events)
        if finished is not None:
            running[finished] -= 1
            committed.add(finished)
        order = orders[shard]
        busy = shares.at_work(committed, but=shard) if shares is not None else ()
        while position[shard] < len(order):
            video = order[position[shard]]
            position[shard] += 1
            if video in committed or video in busy or (claims and running.get(video)):
                continue
            running[video] = running.get(video, 0) + 1
            heapq.heappush(events, (now + seconds[video], shard, video))
            break
        else:
            stopped[shard] = now
    assert committed == set(seconds)
    useful = sum(seconds.values())
    return useful / (count * max(stopped)), useful / sum(stopped)


def schemes(plan: list, count: int, seconds: dict) -> dict:
    """``seconds``: encoding time per video; a part takes its video's time / its parts."""
    ids = sorted(entry["video_id"] for entry in plan)
    every_nth = [ids[index::count] for index in range(count)]
    parts = {entry["video_id"]: parts_of(entry) for entry in plan}
    items = {item: seconds[item_video(item)] / parts[item_video(item)]
             for item, _ in work_items(plan)}
    plan_shares = Shares(plan, count)
    stealing = [work_order(plan, Shard(index, count, "bench")) for index in range(count)]
    longest = max(items.values())
    with_claims = simulate(stealing, items, True, Shares(plan, count))
    return {"every-Nth": simulate(every_nth, seconds, claims=True)[0],
            "longest-first": simulate(plan_shares.owned, items, claims=True)[0],
            "plan, claims": with_claims[0],
            "plan, no locks": simulate(stealing, items, False, Shares(plan, count))[0],
            "plan, job array": with_claims[1],
            "bound": sum(items.values()) / (count * max(longest, sum(items.values()) / count))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="8,32,64")
    parser.add_argument("--noise", type=float, default=0.15,
                        help="sigma of the lognormal encoding-time factor per video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = [int(part) for part in args.shards.split(",")]
    part_seconds = float(os.environ.get(PART_SECONDS_ENV) or PART_SECONDS)
    rng = np.random.default_rng(args.seed)
    header = f"{'distribution':<17} {'shards':>6}" + "".join(
        f" {name:>15}" for name in ("every-Nth", "longest-first", "plan, claims",
                                    "plan, no locks", "plan, job array", "bound"))
    print(header)
    worst = {}
    for name, draw in DISTRIBUTIONS.items():
        durations = draw(rng)
        factors = rng.lognormal(0.0, args.noise, len(durations))
        plan = [{"video_id": f"v{index:05d}", "duration": float(duration),
                 "parts": part_count(float(duration))} for index, duration in enumerate(durations)]
        seconds = {entry["video_id"]: entry["duration"] * factor
                   for entry, factor in zip(plan, factors)}
        split = sum(entry["parts"] > 1 for entry in plan)
        print(f"# {name}: {len(plan)} videos, {durations.sum() / 3600:.1f} h, median "
              f"{np.median(durations) / 60:.1f} min, longest {durations.max() / 60:.1f} min; "
              f"{split} split into parts of at most {part_seconds:.0f} s")
        for count in counts:
            shares_ = schemes(plan, count, seconds)
            print(f"{name:<17} {count:>6}" + "".join(f" {value:>15.3f}"
                                                     for value in shares_.values()))
            if count == max(counts):
                worst[name] = min(shares_["plan, claims"], shares_["plan, no locks"])
    print(f"plan + stealing at {max(counts)} shards, worst of both distributions: "
          f"{min(worst.values()):.3f}")


if __name__ == "__main__":
    main()
