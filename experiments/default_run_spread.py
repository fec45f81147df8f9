"""The default run's spread: ``unisd-train --overwrite`` in a fresh process per run, over
seeds, intra-op thread counts and ``--deterministic`` (docs/ablations.md, "The default run").

``python -m experiments.default_run_spread`` (from the repository root) runs each planned
(seed, threads, deterministic) job as ``python -m unisd_fast.train --overwrite --no-progress
--seed S --output-dir <work-dir>/<run>`` in an emptied folder, with ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` set to the thread count: the base's pre-training is part of every run.
Each run's record (student and teacher accuracy, retention perplexity and KL, the base's
pre-training steps and seconds, wall time, OMP_WAIT_POLICY as inherited, and the load average
before and after) is appended to ``runs.jsonl`` as it finishes (``--workers`` runs at a
time); an interrupted spread resumes from it. ``spread.md`` holds one row per run and the
min / median / max over all of them.

The plan: every ``--seeds`` at ``--threads`` (1: the default run's own count, OMP_NUM_THREADS
unset), then the ``--variant-seeds`` with ``--deterministic`` at ``--threads``, then at each
of ``--variant-threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    seed: int
    threads: int
    deterministic: bool

    @property
    def name(self) -> str:
        return f"seed{self.seed}-t{self.threads}" + ("-det" if self.deterministic else "")


def plan(seeds, threads, variant_seeds, variant_threads) -> list[Job]:
    """Every seed at ``threads``, then each variant seed deterministic at ``threads``, then
    at each variant thread count (the slowest on a busy machine last); no job twice."""
    jobs = [Job(s, threads, False) for s in seeds]
    jobs += [Job(s, threads, True) for s in variant_seeds]
    jobs += [Job(s, t, False) for t in variant_threads for s in variant_seeds]
    return list(dict.fromkeys(jobs))


def command(job: Job, work_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "unisd_fast.train", "--overwrite", "--no-progress"]
    cmd += ["--seed", str(job.seed), "--output-dir", str(work_dir / job.name)]
    return cmd + (["--deterministic"] if job.deterministic else [])


def run_job(job: Job, work_dir: Path) -> dict:
    """One default run in a fresh process and an empty folder (no cached base); its record."""
    shutil.rmtree(work_dir / job.name, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command(job, work_dir), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{job.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    base = json.loads((work_dir / job.name / "base_model" / "pretrain.json").read_text())
    after, before = summary["eval"], summary["first_eval"]
    return {
        **asdict(job),
        "student": after["accuracy"],
        "teacher": after["teacher_accuracy"],
        "student_before": before["accuracy"],
        "retention_ppl": after["retention_ppl"],
        "kl_base": after["kl_base"],
        "steps": summary["step"],
        "pretrain_steps": base["steps"],
        "pretrain_reached": base["reached"],
        "pretrain_s": base["seconds"],
        "base_copy": base["copy"],
        "wall_s": wall,
        "omp_wait_policy": env.get("OMP_WAIT_POLICY", "default"),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spread_table(records: list[dict], cmd: str, workers: int = 1) -> str:
    """One row per run, then min / median / max of each figure over all runs."""
    cols = [
        ("student", "student", "{:.1%}"),
        ("teacher", "teacher", "{:.1%}"),
        ("student_before", "student at step 0", "{:.1%}"),
        ("retention_ppl", "retention ppl", "{:.2f}"),
        ("kl_base", "KL to base", "{:.3f}"),
        ("pretrain_steps", "pre-train steps", "{:.0f}"),
        ("pretrain_s", "pre-train s", "{:.0f}"),
        ("wall_s", "wall s", "{:.0f}"),
    ]
    head = "| run | seed | threads | deterministic | " + " | ".join(c[1] for c in cols)
    head += " | OMP wait policy | load before / after |"
    lines = [
        f"Default run spread: {len(records)} runs, each a fresh process of `{cmd}`"
        f" (OMP_NUM_THREADS / MKL_NUM_THREADS = threads), {workers} at a time.",
        "",
        head,
        "|" + "---|" * (len(cols) + 6),
    ]
    for r in records:
        cells = " | ".join(fmt.format(r[key]) for key, _, fmt in cols)
        lines.append(
            f"| {Job(r['seed'], r['threads'], r['deterministic']).name} | {r['seed']} | "
            f"{r['threads']} | {'on' if r['deterministic'] else 'off'} | {cells} | "
            f"{r['omp_wait_policy']} | {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    lines += ["", "| figure | min | median | max |", "|---|---|---|---|"]
    for key, label, fmt in cols:
        values = [r[key] for r in records]
        stats = (min(values), statistics.median(values), max(values))
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in stats) + " |")
    unreached = [r for r in records if not r["pretrain_reached"]]
    lines += ["", f"Pre-training missed its copying target on {len(unreached)} run(s)."]
    return "\n".join(lines) + "\n"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.default_run_spread")
    p.add_argument("--output", default="results/default_run", help="runs.jsonl and spread.md")
    p.add_argument("--work-dir", default="runs/default_run_spread", help="the runs' folders")
    p.add_argument("--seeds", default="0,1,2,3,4,42", help="seeds run at --threads")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the seed runs")
    p.add_argument("--variant-seeds", default="42,0", help="seeds of the variant runs")
    p.add_argument("--variant-threads", default="2,4", help="thread counts of the variants")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (each its process)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out, work = Path(args.output), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(
        ints(args.seeds), args.threads, ints(args.variant_seeds), ints(args.variant_threads)
    )
    records = read_records(out / "runs.jsonl")
    done = {Job(r["seed"], r["threads"], r["deterministic"]) for r in records}
    todo = [job for job in jobs if job not in done]
    cmd = "python -m unisd_fast.train --overwrite --no-progress --seed S [--deterministic]"
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        running = [pool.submit(run_job, job, work) for job in todo]
        for i, future in enumerate(as_completed(running), 1):
            record = future.result()
            records.append(record)
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            name = Job(record["seed"], record["threads"], record["deterministic"]).name
            print(
                f"[{i}/{len(todo)}] {name}: student {record['student']:.1%}, teacher "
                f"{record['teacher']:.1%}, pre-training {record['pretrain_steps']} steps, "
                f"{record['wall_s']:.0f} s at load {record['load_before']:.1f}",
                flush=True,
            )
            (out / "spread.md").write_text(spread_table(records, cmd, args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
