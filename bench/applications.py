"""The applications at full size: MGD against every baseline, on training seeds MGD never saw.

    python bench/applications.py                       # all five, engine auto (the runtime when built)
    python bench/applications.py --engine jax          # JAX autodiff through lax.scan instead
    python bench/applications.py --only data-selection,attribution

Writes ``bench/results/applications.md`` and ``applications.json`` (and, per
application, ``bench/results/applications/<name>/result.json`` and its plot),
then prints, per application, a table of MGD and every baseline (mean +-
standard error over unseen training seeds, or over test examples for
attribution), the strongest baseline on the primary metric, whether MGD beats
it, and the application's target, met or missed. Each application is the
function behind ``metagrad run <name>`` with its default (full) sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from common import RESULTS_DIR, save_json, save_text

ORDER = ["data-selection", "poisoning", "lr-schedule", "attribution", "smoothness"]


def _cell(v) -> str:
    from metagrad.applications.common import fmt_spread

    if isinstance(v, dict) and "mean" in v:
        return fmt_spread(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (int, str)):
        return str(v)
    return ""


def comparison_lines(comp: dict) -> list[str]:
    """A markdown table of every method (MGD, baselines, references) and the verdict lines."""
    from metagrad.applications.common import fmt_spread

    # the primary metric, the other metrics with a spread, then plain numbers (detection AUROC, tuned values...)
    columns = {k: v for row in comp["methods"].values() for k, v in row.items() if k != comp["primary"]}
    metrics = ([comp["primary"]] + [k for k, v in columns.items() if isinstance(v, dict) and "mean" in v]
               + [k for k, v in columns.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)])
    role = {m: "MGD" if m == comp["mgd"] else ("reference" if m in comp["references"] else "baseline")
            for m in comp["methods"]}
    lines = [f"Primary metric: **{comp['primary']}** ({'higher' if comp['higher_is_better'] else 'lower'} is "
             f"better); mean +- standard error over {comp['unit']}.", "",
             "| method | role | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for m, v in comp["methods"].items():
        cells = [_cell(v.get(k)) for k in metrics]
        if m == comp["mgd"]:
            cells[0] = f"**{cells[0]}**"
        lines.append(f"| {m} | {role[m]} | " + " | ".join(cells) + " |")
    strongest = comp["strongest_baseline"]
    lines.append("")
    if strongest is not None:
        diff = comp.get("mgd_minus_strongest")
        paired = f" (MGD minus it, paired: {fmt_spread(diff)})" if diff else ""
        lines.append(f"Strongest baseline on {comp['primary']}: **{strongest}**{paired}. "
                     f"MGD beats it: **{'yes' if comp['mgd_beats_strongest'] else 'NO'}**.")
    lines.append(f"Target: {comp['target']}: **{'met' if comp['target_met'] else 'MISSED'}**.")
    return lines


def smoothness_lines(r: dict) -> list[str]:
    lines = ["| recipe | S (weights) | S (val losses) | prediction Spearman | signs | val loss |",
             "|---|---|---|---|---|---|"]
    for k, v in r["metrics"].items():
        lines.append(f"| {k} | {v['S_params']:+.2f} | {v['S_outputs']:+.2f} | {v['pred_spearman']:+.2f} | "
                     f"{v['pred_sign_agreement']:.2f} | {v['val_loss']:.3f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("auto", "metagrad", "jax"), default="auto")
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated applications (default: all)")
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in ORDER:
            parser.error(f"--only: unknown application {n!r}; known: {', '.join(ORDER)}")

    import importlib

    os.makedirs(args.out, exist_ok=True)
    results, seconds = {}, {}
    for name in names:
        mod = importlib.import_module("metagrad.applications." + name.replace("-", "_"))
        t0 = time.perf_counter()
        results[name] = mod.run(out=os.path.join(args.out, "applications", name), engine=args.engine,
                                progress=not args.quiet)
        seconds[name] = time.perf_counter() - t0
        print(f"== {name}: {seconds[name]:.1f}s", file=sys.stderr, flush=True)

    command = " ".join(["python bench/applications.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["# metagrad applications on sklearn digits", "",
             f"Command: `{command}`. Engine requested: `{args.engine}`. Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Every method is reported on training seeds (initialization and "
             "batch order) that MGD and the baselines' tuning never saw.", ""]
    for name in names:
        r = results[name]
        lines += [f"## {name} (engine `{r['engine']}`, {seconds[name]:.0f} s)", ""]
        lines += comparison_lines(r["comparison"]) if "comparison" in r else smoothness_lines(r)
        lines.append("")
    lines.append(f"Total: {sum(seconds.values()):.0f} s.")
    md = "\n".join(lines) + "\n"
    stem = "applications" if args.engine == "auto" else f"applications_{args.engine}"
    save_text(os.path.join(args.out, stem + ".md"), md)
    summary = {name: {"engine": results[name]["engine"], "seconds": seconds[name],
                      "comparison": results[name].get("comparison"), "metrics": results[name]["metrics"],
                      "targets": results[name].get("targets"), "params": results[name]["params"]} for name in names}
    save_json(os.path.join(args.out, stem + ".json"), summary)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
