"""The persistent compile cache: a second process compiling the same task.

For each task (the digits MLP of ``tasks.py``, and a Flax transformer language
model of about 110k parameters), a fresh process compiles the task with an
empty cache directory, then another fresh process compiles the same task
with that directory. Each reports the seconds ``task.compile(z)`` took (and
a metagradient, to show the cached executables run). The target: the second
compile takes at most 10% of the first.

    python bench/compile_cache.py [--repeat 2]

Writes bench/results/compile_cache.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

from common import BENCH_DIR, write_results

CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {bench!r})
    import numpy as np
    import metagrad
    from compile_cache import make
    task, z = make({kind!r})
    start = time.perf_counter()
    compiled = task.compile(z)
    seconds = time.perf_counter() - start
    value, _ = compiled.metagradient(z, metagrad.Replay(k=4))
    print(json.dumps({{"seconds": seconds, "value": float(np.asarray(value))}}))
""")


def _transformer():
    """A causal transformer LM in Flax: 2 pre-LayerNorm blocks, GELU MLP, AdamW; per-sequence weights z."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import metagrad

    vocab, length, width, heads, batch, sequences, steps = 64, 32, 64, 4, 8, 256, 50

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            x = x + nn.SelfAttention(num_heads=heads)(nn.LayerNorm()(x), mask=mask)
            return x + nn.Dense(width)(nn.gelu(nn.Dense(2 * width)(nn.LayerNorm()(x))))

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(vocab, width)(tokens) + self.param("position", nn.initializers.normal(0.02),
                                                             (length, width))
            for _ in range(2):
                x = Block()(x)
            return nn.Dense(vocab)(nn.LayerNorm()(x))

    model, opt = LM(), optax.adamw(3e-3, eps_root=1e-12, weight_decay=0.01)
    tokens = np.random.default_rng(0).integers(0, vocab, (sequences + 32, length + 1)).astype(np.int32)
    data = {"train": tokens[:sequences], "val": tokens[sequences:]}

    def losses(params, seqs):
        logits = model.apply(params, seqs[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean(axis=1)

    def init(z, data):
        params = model.init(jax.random.PRNGKey(0), data["train"][:1, :-1])
        return params, opt.init(params)

    def step(state, z, data, t):
        params, opt_state = state
        index = (t * batch + jnp.arange(batch)) % sequences
        grads = jax.grad(lambda p: jnp.mean(z[index] * losses(p, data["train"][index])))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def output(state, z, data):
        return jnp.mean(losses(state[0], data["val"]))

    return metagrad.Task(init, step, output, steps, data), np.ones(sequences, np.float32)


def make(kind: str):
    if kind == "transformer":
        return _transformer()
    from tasks import make_task

    return make_task(kind, 200)


def _child(kind: str, cache_dir: str) -> dict:
    env = dict(os.environ, METAGRAD_CACHE_DIR=cache_dir, METAGRAD_CACHE="1")
    done = subprocess.run([sys.executable, "-c", CHILD.format(bench=BENCH_DIR, kind=kind)], capture_output=True,
                          text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2, help="first/second pairs per task")
    parser.add_argument("--kinds", default="mlp,transformer")
    args = parser.parse_args(argv)
    rows = []
    for kind in args.kinds.split(","):
        firsts, seconds = [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="metagrad-cache-") as cache_dir:
                first = _child(kind, cache_dir)
                second = _child(kind, cache_dir)
            assert first["value"] == second["value"], (first, second)
            firsts.append(first["seconds"])
            seconds.append(second["seconds"])
        row = {"task": kind, "first_s": statistics.median(firsts), "second_s": statistics.median(seconds),
               "first_samples": firsts, "second_samples": seconds}
        row["ratio"] = row["second_s"] / row["first_s"]
        row["target_met"] = row["ratio"] <= 0.10
        rows.append(row)
        print(f"{kind}: first compile {row['first_s']:.1f} s, second process {row['second_s']:.2f} s "
              f"= {100 * row['ratio']:.1f}% (target <= 10%: {'met' if row['target_met'] else 'MISSED'})", flush=True)
    lines = ["# Compile time: a second process with the persistent cache", "",
             "| task | first compile (s) | second process (s) | second / first | target <= 10% |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {r['task']} | {r['first_s']:.1f} | {r['second_s']:.2f} | {100 * r['ratio']:.1f}% | "
              f"{'met' if r['target_met'] else 'missed'} |" for r in rows]
    write_results("compile_cache", lines, {"rows": rows})


if __name__ == "__main__":
    main()
