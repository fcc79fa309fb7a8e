"""The applications at full size: one table of their measured numbers.

    python bench/applications.py                       # all five, engine auto (the runtime when built)
    python bench/applications.py --engine jax          # JAX autodiff through lax.scan instead
    python bench/applications.py --only data-selection,attribution

Writes ``bench/results/applications.md`` and ``applications.json`` (and, per
application, ``bench/results/applications/<name>/result.json`` and its plot),
then prints the markdown table. Each application is the function behind
``metagrad run <name>`` with its default (full) sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")

ORDER = ["data-selection", "poisoning", "lr-schedule", "attribution", "smoothness"]


def _fmt(x, digits=4):
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def rows_for(name: str, r: dict) -> list[tuple[str, str, str]]:
    """``(quantity, value, target/comparison)`` rows of one application's result."""
    m = r["metrics"]
    if name == "data-selection":
        return [
            ("AUROC of -z, flipped vs clean", _fmt(m["auroc"], 3), ">= 0.9"),
            ("AUROC of the first metagradient alone", _fmt(m["auroc_first_metagradient"], 3), ""),
            ("test acc, all (noisy) data", _fmt(m["test_acc_all_data"]), ""),
            ("test acc, MGD weights", _fmt(m["test_acc_mgd_weights"]), "> all data"),
            ("test acc, MGD selected (z > 0.5)", _fmt(m["test_acc_mgd_selected"]), "> all data"),
            ("test acc, clean examples only (oracle)", _fmt(m["test_acc_clean_only_oracle"]), ""),
            ("flipped / clean examples removed", f"{m['flipped_removed_fraction']:.1%} / "
                                                 f"{m['clean_removed_fraction']:.1%}", ""),
        ]
    if name == "poisoning":
        out = []
        for group, label in (("mgd_seeds", "seeds MGD used"), ("unseen_seeds", "unseen seeds")):
            if group not in m:
                continue
            g = m[group]
            out += [
                (f"test acc clean / label-flip / MGD poison ({label})",
                 f"{g['test_acc_clean']:.4f} / {g['test_acc_labelflip_baseline']:.4f} / {g['test_acc_mgd_poison']:.4f}",
                 ""),
                (f"accuracy drop ratio MGD / label-flip ({label})", _fmt(g["drop_ratio_mgd_over_baseline"], 2), ">= 3"),
            ]
        out.append(("poisoned examples, mean absolute pixel change",
                    f"{m['n_poison']}, {m['mean_abs_pixel_change']:.3f}", ""))
        return out
    if name == "lr-schedule":
        g, b, mg = m["grid_equal_budget"], m["grid_big"], m["mgd"]
        return [
            ("val / test loss, MGD schedule", f"{mg['val_loss']:.4f} / {mg['test_loss']:.4f}",
             "<= best grid (equal budget)"),
            (f"val / test loss, best of {g['size']}-schedule grid ({g['family']}, peak {g['peak']:.3g})",
             f"{g['val_loss']:.4f} / {g['test_loss']:.4f}", ""),
            (f"val / test loss, best of {b['size']}-schedule grid ({b['family']}, peak {b['peak']:.3g})",
             f"{b['val_loss']:.4f} / {b['test_loss']:.4f}", ""),
            ("val / test loss on unseen seeds: MGD vs equal-budget grid",
             f"{mg['unseen_val_loss']:.4f} / {mg['unseen_test_loss']:.4f} vs "
             f"{g['unseen_val_loss']:.4f} / {g['unseen_test_loss']:.4f}", ""),
            ("flat start schedule val loss", _fmt(m["start_flat"]["val_loss"]), ""),
        ]
    if name == "attribution":
        out = []
        for study, s in m.items():
            for frac, v in s.items():
                out.append((f"Spearman, {float(frac):.0%} removed, {study} recipe (mean / min over test examples)",
                            f"{v['mean_spearman']:.3f} / {v['min_spearman']:.3f}",
                            ">= 0.8" if study == "smooth" and frac == min(s, key=float) else ""))
        return out
    if name == "smoothness":
        return [(f"{k}", f"S {v['S_params']:+.2f} (weights) {v['S_outputs']:+.2f} (val losses); prediction "
                         f"Spearman {v['pred_spearman']:+.2f}, signs {v['pred_sign_agreement']:.2f}; val loss "
                         f"{v['val_loss']:.3f}", "") for k, v in m.items()]
    return []


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

    from metagrad._src.cli import APPLICATIONS
    import importlib

    os.makedirs(args.out, exist_ok=True)
    results, seconds = {}, {}
    for name in names:
        mod = importlib.import_module(APPLICATIONS[name])
        t0 = time.perf_counter()
        results[name] = mod.run(out=os.path.join(args.out, "applications", name), engine=args.engine,
                                progress=not args.quiet)
        seconds[name] = time.perf_counter() - t0
        print(f"== {name}: {seconds[name]:.1f}s", file=sys.stderr, flush=True)

    lines = ["# metagrad applications on sklearn digits", "",
             f"Engine requested: `{args.engine}`. Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d %H:%M')}.", ""]
    for name in names:
        r = results[name]
        lines += [f"## {name} (engine `{r['engine']}`, {seconds[name]:.0f} s)", "",
                  "| quantity | measured | target |", "|---|---|---|"]
        lines += [f"| {q} | {v} | {t} |" for q, v, t in rows_for(name, r)]
        if r.get("targets"):
            lines += ["", "Targets met: " + ", ".join(f"{k}: {_fmt(v)}" for k, v in r["targets"].items())]
        lines.append("")
    lines.append(f"Total: {sum(seconds.values()):.0f} s.")
    md = "\n".join(lines) + "\n"
    stem = "applications" if args.engine == "auto" else f"applications_{args.engine}"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    summary = {name: {"engine": results[name]["engine"], "seconds": seconds[name],
                      "metrics": results[name]["metrics"], "targets": results[name].get("targets"),
                      "params": results[name]["params"]} for name in names}
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
