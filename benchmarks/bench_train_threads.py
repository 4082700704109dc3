"""Training step time by torch threads and OpenMP wait policy, idle and loaded machine (issue 14).

One BranchedERFNet training step (forward, loss-free backward on the sum of the output, Adam) on a batch
of 8 crops of 128 x 128, timed in a fresh process per setting (OpenMP reads its environment once, at
start): threads 1 and 2 (this machine's cores) x ``OMP_WAIT_POLICY`` unset (what a user gets), active
and passive. "Loaded" runs
the same with busy-looping processes beside it, one per core, as a shared microscope PC or CI box has.

    python benchmarks/bench_train_threads.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

from _common import RESULTS, finish, header, log, machine_line

CHILD = """
import json, sys, time, torch
from embedseg_training.model import BranchedERFNet
torch.set_num_threads({threads})
torch.manual_seed(0)
model = BranchedERFNet(2, 1)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
x = torch.rand(8, 1, 128, 128)
times = []
for step in range({steps} + 2):
    t = time.perf_counter()
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps(sorted(times[2:])[len(times[2:]) // 2]))
"""


def busy() -> None:
    while True:
        pass


def step_time(threads: int, policy: str, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy != "unset":  # unset: what a user gets
        env["OMP_WAIT_POLICY"] = policy
    code = CHILD.format(threads=threads, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    doc = header("train_threads", cores, steps=args.steps, batch="8 x 1 x 128 x 128")
    rows = []
    for load in ("idle", "loaded"):
        workers = [
            multiprocessing.Process(target=busy, daemon=True) for _ in range(cores if load == "loaded" else 0)
        ]
        for w in workers:
            w.start()
        time.sleep(1.0 if workers else 0.0)
        try:
            for threads in sorted({1, cores}):
                for policy in ("unset", "ACTIVE", "PASSIVE"):
                    s = step_time(threads, policy, args.steps)
                    rows.append({"load": load, "threads": threads, "omp_wait_policy": policy, "step_s": s})
                    log(f"{load}: {threads} thread(s), {policy}: {s:.3f} s per step")
        finally:
            for w in workers:
                w.terminate()
    doc["rows"] = rows
    finish(doc, markdown, "train_threads", args.out)


def markdown(doc: dict) -> str:
    lines = [
        "# Training step time by threads and OpenMP wait policy, idle and loaded",
        "",
        machine_line(doc),
        "",
        "One step (batch 8 x 128 x 128, forward + backward + Adam), median of "
        f"{doc['parameters']['steps']} after 2 warm-up steps, each setting in a fresh process. Loaded: one "
        "busy-looping process per core beside it.",
        "",
        "| load | threads | OMP_WAIT_POLICY | s per step |",
        "|---|---:|---|---:|",
    ]
    lines += [
        f"| {r['load']} | {r['threads']} | {r['omp_wait_policy']} | {r['step_s']:.3f} |" for r in doc["rows"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
