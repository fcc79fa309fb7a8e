"""Command line: ``metagrad run <application> [--steps N] [--out DIR] ...``.

Each application writes ``result.json`` and a PNG plot into ``--out`` and
prints MGD against its baselines on unseen training seeds. Every argument is
checked before any work. ``metagrad list`` shows the applications and their
parameters; any parameter can be set with ``--set name=value``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile

APPLICATIONS = {
    "data-selection": "metagrad.applications.data_selection",
    "poisoning": "metagrad.applications.poisoning",
    "lr-schedule": "metagrad.applications.lr_schedule",
    "attribution": "metagrad.applications.attribution",
    "smoothness": "metagrad.applications.smoothness",
}


def _module(name: str):
    return importlib.import_module(APPLICATIONS[name])


def _convert(name: str, text: str, default):
    """``text`` as the type of ``default`` (bool, int, float, tuple of floats)."""
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        kind = "a comma-separated list of numbers" if isinstance(default, tuple) else type(default).__name__
        raise argparse.ArgumentTypeError(f"--set {name}={text!r}: expected {kind}") from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metagrad", description="Exact metagradients through whole training runs: "
                                     "applications on sklearn digits.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an application", description="Run an application; writes result.json "
                         "and a PNG plot to --out and prints its key numbers.")
    run.add_argument("application", choices=sorted(APPLICATIONS), help="which application")
    run.add_argument("--steps", type=int, default=None,
                     help="number of metagradient-descent steps (applications that run MGD)")
    run.add_argument("--out", default=None, help="output folder (default: metagrad_results/<application>)")
    run.add_argument("--engine", choices=("auto", "metagrad", "jax"), default="auto",
                     help="metagradients from the C++ runtime ('metagrad'), from JAX autodiff through lax.scan "
                          "('jax'), or the runtime when available ('auto', default)")
    run.add_argument("--toy", action="store_true", help="tiny sizes (seconds; for smoke tests)")
    run.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                     help="set an application parameter (see 'metagrad list'); repeatable")
    run.add_argument("--quiet", action="store_true", help="no progress bars or log lines on stderr (bars are "
                     "drawn only when stderr is a terminal)")
    sub.add_parser("list", help="list the applications and their default parameters")
    return parser


def _settings(parser, app: str, args) -> dict:
    """The application's checked parameters from ``--set``, ``--steps`` and ``--toy``; any bad one ends the
    command with a usage error before any work."""
    from metagrad.applications.common import ArgumentError

    mod = _module(app)
    defaults = mod.TOY if args.toy else mod.DEFAULTS
    kw = {}
    for item in args.settings:
        if "=" not in item:
            parser.error(f"--set expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in defaults:
            parser.error(f"--set {name}: not a parameter of {app}; its parameters are: {', '.join(sorted(defaults))}")
        try:
            kw[name] = _convert(name, value, defaults[name])
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    if args.steps is not None:
        if "steps" not in defaults:
            parser.error(f"--steps: {app} runs no metagradient descent; its parameters are: "
                         f"{', '.join(sorted(defaults))}")
        kw["steps"] = args.steps
    try:
        return mod.params(args.toy, **kw)
    except ArgumentError as err:
        parser.error(str(err))


def _check_out(parser, out: str) -> None:
    """``out`` is, or can be made, a writable folder (checked before any work, not after the run)."""
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out!r} is a file, not a folder; give a folder (it is created if missing)")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        parser.error(f"--out {out!r}: cannot write there ({err.strerror or err}); give a writable folder")


def _report(app: str, result: dict, out: str) -> dict:
    """What the command prints: the head-to-head on unseen seeds, the targets, the time, where the files are."""
    from metagrad.applications.common import summary

    report = {"application": app, "engine": result.get("engine")}
    if "comparison" in result:
        report["comparison"] = summary(result["comparison"])
    else:
        report["metrics"] = result.get("metrics", {})
    report["targets"] = result.get("targets")
    report["seconds"] = round(result.get("seconds", {}).get("total", float("nan")), 1)
    report["out"] = os.path.abspath(out)
    return report


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(APPLICATIONS):
            mod = _module(name)
            print(f"{name}: {(mod.__doc__ or '').strip().splitlines()[0]}")
            print("    " + ", ".join(f"{k}={v}" for k, v in mod.DEFAULTS.items()))
        return 0
    params = _settings(parser, args.application, args)
    out = args.out or os.path.join("metagrad_results", args.application)
    _check_out(parser, out)
    result = _module(args.application).run(out=out, engine=args.engine, progress=not args.quiet, **params)
    print(json.dumps(_report(args.application, result, out), indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
