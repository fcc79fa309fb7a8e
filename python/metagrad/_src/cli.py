"""Command line: ``metagrad run <application> [--steps N] [--out DIR] ...``.

Each application writes ``result.json`` and a PNG plot into ``--out`` and
prints its key numbers. ``metagrad list`` shows the applications and their
parameters; any parameter can be set with ``--set name=value``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

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
    run.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    sub.add_parser("list", help="list the applications and their default parameters")
    return parser


def _settings(parser, app: str, args) -> dict:
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
        if args.steps < 0:
            parser.error(f"--steps must be >= 0, got {args.steps}")
        kw["steps"] = args.steps
    return kw


def _key_numbers(result: dict) -> dict:
    """The metrics without long lists, for printing."""

    def trim(x):
        if isinstance(x, dict):
            return {k: trim(v) for k, v in x.items() if not (isinstance(v, list) and len(v) > 10)}
        if isinstance(x, float):
            return round(x, 4)
        return x

    return trim(result.get("metrics", {}))


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(APPLICATIONS):
            mod = _module(name)
            print(f"{name}: {(mod.__doc__ or '').strip().splitlines()[0]}")
            print("    " + ", ".join(f"{k}={v}" for k, v in mod.DEFAULTS.items()))
        return 0
    kw = _settings(parser, args.application, args)
    out = args.out or os.path.join("metagrad_results", args.application)
    mod = _module(args.application)
    from metagrad.applications.common import ArgumentError

    try:
        result = mod.run(out=out, engine=args.engine, progress=not args.quiet, toy=args.toy, **kw)
    except ArgumentError as err:
        parser.error(str(err))
    print(json.dumps({"application": args.application, "engine": result.get("engine"),
                      "metrics": _key_numbers(result), "targets": result.get("targets"),
                      "seconds": round(result.get("seconds", {}).get("total", float("nan")), 1),
                      "out": os.path.abspath(out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
