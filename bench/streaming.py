"""Streamed training data (metagrad.Stream) against the same tasks with their data on the device.

    python bench/streaming.py                  # all three parts below
    python bench/streaming.py --parts speed --kinds mlp --repeat 3

* ``memory``: the digits MLP (T = 1000, one weight per training row) over 1,024 rows and over
  10,240 rows (the rows tiled 10 times), resident and streamed, one fixed plan: device bytes
  (the run's peak plus data and z) of each.
* ``refused``: 1,048,576 rows (the digits tiled: 256 MiB of float32) in a file on disk, ``Auto(memory=64 MiB)``:
  the resident form is refused before it runs; the streamed form reads the file and runs.
* ``speed``: the digits MLP and CNN (T = 1000) and the transformer LM (T = 200, its token
  sequences read from a ``.npy`` file on disk), resident and streamed, the same batches:
  training and the default metagradient (``Auto()``, each form its own plan), the runs of
  the two forms interleaved, each figure the median of ``--repeat``. Also the time the
  streamed run waited for data and the planner's predicted time against the measured.

Writes ``bench/results/streaming.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from common import fmt_bytes, machine_notes, write_results

MIB = 2**20


def _tiled(times: int) -> dict:
    import numpy as np

    from tasks import digits

    return {"x": np.ascontiguousarray(np.tile(digits()["x"], (times, 1))),
            "y": np.ascontiguousarray(np.tile(digits()["y"], times))}


def memory(steps: int) -> list[dict]:
    import metagrad
    from tasks import make_task

    schedule = metagrad.Budget(states=32, block=10)
    rows = []
    for times in (1, 10):
        train = _tiled(times)
        for streamed in (False, True):
            task, z = make_task("mlp", steps, streamed=streamed, rows=train)
            _, _, report = task.compile(z).metagradient(z, schedule, report=True)
            rows.append({"rows": len(train["y"]), "streamed": streamed, "dataset_bytes": train["x"].nbytes +
                         train["y"].nbytes, "schedule": report.schedule, "peak_device_bytes": report.peak_device_bytes,
                         "data_bytes": report.data_bytes, "device_bytes": report.peak_device_bytes + report.data_bytes,
                         "streamed_bytes": report.streamed_bytes})
            print(rows[-1], flush=True)
    return rows


def refused(steps: int, folder: str) -> dict:
    import numpy as np

    import metagrad
    from tasks import make_task

    from tasks import digits

    n, tile = 2**20, len(digits()["y"])
    path = os.path.join(folder, "rows.npy")
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 64))
    for start in range(0, n, tile):  # the digits, tiled: written a block at a time, never whole in memory
        x[start:start + tile] = digits()["x"]
    x.flush()
    del x
    y = np.tile(digits()["y"], n // tile)
    budget = metagrad.Auto(memory=64 * MIB)
    result = {"rows": n, "file_bytes": os.path.getsize(path), "budget_bytes": budget.memory}
    task, z = make_task("mlp", steps, rows={"x": np.load(path), "y": y})
    try:
        task.compile(z).metagradient(z, budget)
        result["resident"] = "ran"
    except metagrad.DeviceMemoryError as error:
        result["resident"] = f"refused: {str(error).splitlines()[0]}"
    del task
    task, z = make_task("mlp", steps, streamed=True, rows={"x": np.load(path, mmap_mode="r"), "y": y})
    start = time.perf_counter()
    _, grad, report = task.compile(z).metagradient(z, budget, report=True)
    result.update(streamed_seconds=time.perf_counter() - start, schedule=report.schedule,
                  device_bytes=report.peak_device_bytes + report.data_bytes, streamed_bytes=report.streamed_bytes,
                  finite=bool(np.isfinite(grad).all()))
    print(result, flush=True)
    return result


def _token_file(folder: str) -> str:
    import numpy as np

    from tasks import tokens

    path = os.path.join(folder, "seqs.npy")
    np.save(path, tokens()["seqs"])
    return path


def speed(kind: str, steps: int, repeat: int, folder: str) -> dict:
    import numpy as np

    import metagrad

    from tasks import make_task

    forms = {}
    for streamed in (False, True):
        rows = ({"seqs": np.load(_token_file(folder), mmap_mode="r")} if kind == "transformer" and streamed
                else None)
        task, z = make_task(kind, steps, streamed=streamed, rows=rows)
        compiled = task.compile(z).prepare(metagrad.Auto())  # every program the default plan may use
        compiled.metagradient(z)  # calibrates and chooses
        compiled.train(z)
        forms[streamed] = (compiled, z)
    samples = {form: {"train": [], "metagradient": [], "wait": [], "predicted": []} for form in forms}
    for _ in range(repeat):
        for streamed, (compiled, z) in forms.items():
            start = time.perf_counter()
            compiled.train(z)
            samples[streamed]["train"].append(time.perf_counter() - start)
            start = time.perf_counter()
            _, _, report = compiled.metagradient(z, report=True)
            samples[streamed]["metagradient"].append(time.perf_counter() - start)
            samples[streamed]["wait"].append(report.seconds_waiting_for_data)
            samples[streamed]["predicted"].append(report.predicted_seconds)
            samples[streamed]["schedule"] = report.schedule
            samples[streamed]["run"] = report.seconds_total
            samples[streamed]["misses"] = report.prefetch_misses
    median = {form: {k: statistics.median(v) if isinstance(v, list) else v for k, v in s.items()}
              for form, s in samples.items()}
    row = {"kind": kind, "steps": steps, "repeat": repeat, "resident": median[False], "streamed": median[True],
           "train_ratio": median[True]["train"] / median[False]["train"],
           "metagradient_ratio": median[True]["metagradient"] / median[False]["metagradient"],
           "predicted_over_measured": median[True]["predicted"] / median[True]["metagradient"],
           "samples": {str(form): s for form, s in samples.items()}}
    print({k: v for k, v in row.items() if k != "samples"}, flush=True)
    return row


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    mem = payload.get("memory", [])
    for streamed, marker in ((False, "o"), (True, "s")):
        points = [(r["dataset_bytes"] / MIB, r["device_bytes"] / MIB) for r in mem if r["streamed"] == streamed]
        if points:
            left.plot(*zip(*points), marker=marker, label="streamed" if streamed else "resident")
    left.set_xlabel("training rows (MiB)")
    left.set_ylabel("device bytes of the run (MiB)")
    left.set_title("digits MLP, T = 1000, Budget(states=32, block=10)")
    left.legend()
    rows = payload.get("speed", [])
    kinds = [r["kind"] for r in rows]
    for i, (key, label) in enumerate((("train_ratio", "training"), ("metagradient_ratio", "metagradient"))):
        right.bar([k + i * 0.4 for k in range(len(kinds))], [r[key] for r in rows], width=0.4, label=label)
    right.axhline(1.1, color="gray", linestyle="--", label="target 1.1x")
    right.set_xticks([k + 0.2 for k in range(len(kinds))], kinds)
    right.set_ylabel("streamed / resident (median)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="memory,refused,speed")
    parser.add_argument("--kinds", default="mlp,cnn,transformer")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    command = " ".join(["python bench/streaming.py", *(sys.argv[1:] if argv is None else argv)])
    payload = {"command": command, "machine": machine_notes(), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        if "memory" in parts:
            payload["memory"] = memory(1000)
        if "refused" in parts:
            payload["refused"] = refused(1000, folder)
        if "speed" in parts:
            payload["speed"] = [speed(kind, 200 if kind == "transformer" else 1000, args.repeat, folder)
                                for kind in args.kinds.split(",")]
    md = [f"Command: `{command}`. Load average before: {payload['load_before']:.2f}; nothing else ran.", ""]
    if "memory" in payload:
        md += ["## Device memory does not grow with the dataset", "",
               "| training rows | dataset | form | plan | peak of the run | data and z (+ batches in flight) | "
               "device bytes |", "|---:|---:|---|---|---:|---:|---:|"]
        for r in payload["memory"]:
            md.append(f"| {r['rows']:,} | {fmt_bytes(r['dataset_bytes'])} | "
                      f"{'streamed' if r['streamed'] else 'resident'} | {r['schedule']} | "
                      f"{fmt_bytes(r['peak_device_bytes'])} | {fmt_bytes(r['data_bytes'])} | "
                      f"{fmt_bytes(r['device_bytes'])} |")
        md += ["", "z (one weight per row) and its metagradient stay on the device in both forms: they grow with "
               "the rows (4 bytes each), the batches do not.", ""]
    if "refused" in payload:
        r = payload["refused"]
        md += ["## A dataset refused resident runs streamed", "",
               f"{r['rows']:,} rows ({fmt_bytes(r['file_bytes'])} file), `Auto(memory={fmt_bytes(r['budget_bytes'])})`:",
               "", f"- resident: {r['resident']}",
               f"- streamed from the file: ran in {r['streamed_seconds']:.1f} s with {r['schedule']}, "
               f"{fmt_bytes(r['device_bytes'])} of device memory, {fmt_bytes(r['streamed_bytes'])} streamed; "
               f"metagradient finite: {r['finite']}", ""]
    if "speed" in payload:
        md += ["## Streamed against resident, same batches", "",
               "| task | T | training: streamed / resident | metagradient: streamed / resident | "
               "resident plan | streamed plan | waited for data | predicted / measured (streamed) |",
               "|---|---:|---:|---:|---|---|---:|---:|"]
        for r in payload["speed"]:
            s = r["streamed"]
            md.append(f"| {r['kind']} | {r['steps']} | {r['train_ratio']:.2f}x | {r['metagradient_ratio']:.2f}x | "
                      f"{r['resident']['schedule']} | {s['schedule']} | {1e3 * s['wait']:.1f} ms of "
                      f"{s['metagradient']:.2f} s | {r['predicted_over_measured']:.2f} |")
        md += ["", f"Medians of {args.repeat}, the two forms' runs interleaved. Target: streamed <= 1.1x resident; "
               "the prediction within 20% of the measured time."]
    write_results("streaming", md, payload)
    plot(payload, os.path.join(os.path.dirname(__file__), "results", "streaming.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
