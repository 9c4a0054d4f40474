"""How long a stop request takes: SIGTERM to a training `train.py`, time until it announces the
saved step and until it exits, and how many steps it ran after the signal.

    python benchmarks/stop_latency.py [--config configs/default.py] [--trials 3]

Each trial trains a fresh workdir, waits until the log shows a training step (compilation
done), waits a random fraction of a second more, sends SIGTERM and checks that the announced
step is on disk when the announcement is printed. A preempted pod has about 30 s of notice.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trial(config: str, workdir: Path, rng: random.Random, log_every: int) -> dict:
    out_path, err_path = workdir.parent / "out.txt", workdir.parent / "err.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "train.py"), "--config", config]
    command += ["--workdir", str(workdir), "--no-progress"]
    command += [f"--config.train.log_every={log_every}", "--config.train.eval_every=100000"]
    with out_path.open("w") as out, err_path.open("w") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and '"split": "train"' in metrics.read_text()):
        if process.poll() is not None:
            raise RuntimeError(f"train.py exited early:\n{err_path.read_text()[-2000:]}")
        time.sleep(0.01)
    logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    time.sleep(rng.uniform(0.0, 1.0))
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    marker = "SIGTERM received: checkpoint saved at step "
    while marker not in out_path.read_text():
        if process.poll() is not None:
            raise RuntimeError(f"no announcement:\n{err_path.read_text()[-2000:]}")
        time.sleep(0.002)
    announced_after = time.perf_counter() - signalled
    on_disk = {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
    line = next(x for x in out_path.read_text().splitlines() if x.startswith(marker))
    step = int(line.removeprefix(marker))
    returncode = process.wait()
    return {
        "announced_s": announced_after,
        "exited_s": time.perf_counter() - signalled,
        "steps_after_last_log": step - logged,
        "on_disk": step in on_disk,
        "returncode": returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/default.py"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--log_every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(
        "| trial | signal -> announced (s) | signal -> exit (s) | steps after last log | on disk |"
    )
    print("|---:|---:|---:|---:|---|")
    for index in range(args.trials):
        with tempfile.TemporaryDirectory() as directory:
            result = trial(args.config, Path(directory) / "run", rng, args.log_every)
        assert result["returncode"] == 0, result
        print(
            f"| {index} | {result['announced_s']:.2f} | {result['exited_s']:.2f} | "
            f"{result['steps_after_last_log']} | {result['on_disk']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
