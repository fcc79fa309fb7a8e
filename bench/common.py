"""Shared helpers of the bench scripts: timing, the harness binary, saving tasks, cells run in
subprocesses under time and memory limits, device-memory accounting."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)


def harness_path() -> str:
    """The installed ``metagrad-bench`` executable (on the environment's PATH, beside python)."""
    import shutil

    path = shutil.which("metagrad-bench", path=os.path.dirname(sys.executable)) or shutil.which("metagrad-bench")
    if path is None:
        raise FileNotFoundError("metagrad-bench is not installed: pip install --no-build-isolation -e .")
    return path


def timed(fn, *args, repeat: int = 3, warmup: int = 1, sync=None):
    """Median and min wall seconds of ``fn(*args)`` (``sync`` blocks on the result)."""
    sync = sync or (lambda r: r)
    for _ in range(warmup):
        sync(fn(*args))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sync(fn(*args))
        samples.append(time.perf_counter() - t0)
    return {"median": statistics.median(samples), "min": min(samples), "samples": samples}


def machine_notes() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    import jax

    info["jax"] = jax.__version__
    # Where the runs ran: the runtime's plugin and the devices jax sees (the peers run there).
    info["pjrt_plugin"] = os.path.basename(os.environ.get("METAGRAD_PJRT_PLUGIN") or "xla_cpu_pjrt.so")
    info["devices"] = sorted({f"{d.platform} {d.device_kind}" for d in jax.devices()})
    return info


def add_cell_arguments(parser, *, kinds: str, steps: str, repeat: int, repeat_help: str, out: str) -> None:
    """The options of the scripts that run one subprocess per cell (compare.py, frontier.py)."""
    parser.add_argument("--kinds", default=kinds)
    parser.add_argument("--steps", default=steps)
    parser.add_argument("--max-steps", type=int, default=None, help="skip sizes above this T")
    parser.add_argument("--repeat", type=int, default=repeat, help=repeat_help)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per cell")
    parser.add_argument("--mem-limit-gb", type=float, default=6.0, help="RSS limit per cell")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, out))


_PATH_CHARACTER = r"[^\s\"'`,;:()\\]"


def portable(text: str) -> str:
    """``text`` without this machine's directories, as results are committed: paths inside the repository
    become relative to it, an installed package's start at ``site-packages/``, and other absolute paths
    (temporary folders, home directories) keep their last component alone."""
    text = re.sub(rf"/{_PATH_CHARACTER}*?/site-packages/", "site-packages/", text)
    text = text.replace(REPO_DIR + os.sep, "")
    return re.sub(rf"(?<![\w.])(?:/{_PATH_CHARACTER}+)+/({_PATH_CHARACTER}+)", r"\1", text)


def save_text(path: str, text: str) -> None:
    """Write a result file (``portable``), creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(portable(text))


def save_json(path: str, payload) -> None:
    save_text(path, json.dumps(payload, indent=1, default=float))


def write_results(name: str, markdown: list[str], payload: dict) -> None:
    """``results/<name>.md`` (the table) and ``results/<name>.json`` (the numbers and the machine), and print the table."""
    save_text(os.path.join(RESULTS_DIR, f"{name}.md"), "\n".join(markdown) + "\n")
    save_json(os.path.join(RESULTS_DIR, f"{name}.json"), {"machine": machine_notes(), **payload})
    print("\n".join(markdown))


def save_task(compiled, path: str, *, blocks=()) -> None:
    """``compiled.save(path)`` with the fused reverse programs of each block length in ``blocks``."""
    import metagrad

    for block in blocks:
        if block > 1:
            compiled.prepare(metagrad.Replay(k=2, block=block))
    compiled.save(path)


def fused_lengths(steps: int, block: int) -> tuple[int, ...]:
    """Fused reverse lengths a plan over blocks of ``block`` steps uses."""
    if block <= 1:
        return ()
    lengths = {min(block, steps)}
    if steps % block and steps > block:
        lengths.add(steps % block)
    return tuple(sorted(n for n in lengths if n > 1))


def run_harness(task_dir: str, args: list[str], timeout: float | None = None) -> dict:
    """Run metagrad-bench with ``--json``; returns its parsed output."""
    command = [harness_path(), task_dir, "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def fmt_ratio(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.2f}x"


# --------------------------------------------------------------------------- #
# subprocess runner with a time and RSS limit
# --------------------------------------------------------------------------- #

def _rss_bytes(pid: int) -> int:
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def run_limited(command: list[str], timeout: float, mem_limit: int) -> dict:
    """Run ``command`` (which prints one JSON object); kill it at the limits."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = {"killed": None, "peak_rss_seen": 0}

    def watch():
        start = time.monotonic()
        while proc.poll() is None:
            rss = _rss_bytes(proc.pid)
            state["peak_rss_seen"] = max(state["peak_rss_seen"], rss)
            if rss > mem_limit:
                state["killed"] = f"over {mem_limit / 2**30:.0f} GB RSS"
                proc.kill()
                return
            if time.monotonic() - start > timeout:
                state["killed"] = f"over {timeout:.0f} s"
                proc.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    if state["killed"]:
        return {"status": "limit", "reason": state["killed"]}
    if proc.returncode != 0:
        if "RESOURCE_EXHAUSTED" in stderr or "Out of memory" in stderr:
            asked = re.search(r"allocating (\d+) bytes", stderr)
            what = f" ({int(asked.group(1)) / 2**30:.0f} GiB asked)" if asked else ""
            return {"status": "limit", "reason": f"out of memory{what}"}
        tail = stderr.strip().splitlines()[-3:]
        return {"status": "error", "reason": f"exit {proc.returncode}: {' | '.join(tail)}"[:300]}
    try:
        return {"status": "ok", **json.loads(stdout.strip().splitlines()[-1])}
    except (json.JSONDecodeError, IndexError):
        return {"status": "error", "reason": "no JSON output"}


def replay_device_bytes(stats: dict, largest_program: dict) -> int:
    """Python REPLAY's device memory: its peak live states (``stats`` of ``replay_metagradient``) plus the
    arguments, outputs and temporaries of its largest program (``baselines.memory_stats(method="replay")``:
    the step's or the output's vjp)."""
    return stats["max_live_states"] * largest_program["state_bytes"] + largest_program["total_bytes"]


def flat_leaves(tree) -> np.ndarray:
    """Every leaf of a pytree, raveled into one float64 vector (to compare or take the norm of a gradient)."""
    import jax

    return np.concatenate([np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"
