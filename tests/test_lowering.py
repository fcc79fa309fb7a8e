"""Lowering a Task: validation, Enzyme and JAX reverse programs, fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import runtime
from models import make_task


@pytest.fixture(scope="module", params=["sgdm", "adam"])
def lowered(request):
    task, z = make_task("weights", request.param, steps=5)
    return task, z, {backend: task.compile(z, backend=backend) for backend in ("enzyme", "jax")}


def run_program(program, args):
    executable = runtime.compile_module(program.artifact)
    return [b.to_numpy() for b in executable.execute([runtime.to_device(np.asarray(a)) for a in args])]


def test_reverse_programs_record_their_backend(lowered):
    _, _, compiled = lowered
    assert compiled["enzyme"].programs["step_vjp"].backend == "enzyme"
    assert compiled["jax"].programs["step_vjp"].backend == "jax"
    assert compiled["enzyme"].programs["step"].backend == "none"


@pytest.mark.parametrize("backend", ["enzyme", "jax"])
def test_step_vjp_matches_jax_vjp(lowered, backend):
    task, z, compiled = lowered
    layout = compiled[backend].layout
    rng = np.random.default_rng(1)
    state = task.init(z, task.data)
    for t in range(3):  # a state with non-trivial optimizer moments
        state = task.step(state, z, task.data, jnp.int32(t))
    z = (1.0 + 0.1 * rng.normal(size=z.shape)).astype(np.float32)
    t = jnp.int32(3)
    leaves = jax.tree_util.tree_leaves(state)
    cotangent = [rng.normal(size=leaf.shape).astype(leaf.dtype) if d else None
                 for leaf, d in zip(leaves, layout.differentiable)]
    z_acc = rng.normal(size=z.shape).astype(np.float32)

    _, pull = jax.vjp(lambda s, zz: task.step(s, zz, task.data, t), state, z)
    full = [c if c is not None else np.zeros(leaf.shape, jax.dtypes.float0) for c, leaf in zip(cotangent, leaves)]
    want_state_bar, want_z_bar = pull(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), full))
    want = [leaf for leaf, d in zip(jax.tree_util.tree_leaves(want_state_bar), layout.differentiable) if d]
    want.append(z_acc + want_z_bar)

    data = jax.tree_util.tree_leaves(task.data)
    args = [*leaves, z, *data, t, *[c for c in cotangent if c is not None], z_acc]
    got = run_program(compiled[backend].programs["step_vjp"], args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        scale = float(np.max(np.abs(w)))  # float32 rounding is relative to the array's magnitude
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-6 * scale)


def test_programs_carry_the_contract_signature(lowered):
    _, _, compiled = lowered
    layout = compiled["enzyme"].layout
    step_vjp = compiled["enzyme"].programs["step_vjp"]
    ns, nz, nx, nd = len(layout.state), len(layout.z), len(layout.data), sum(layout.differentiable)
    assert len(step_vjp.inputs) == ns + nz + nx + 1 + nd + nz
    assert step_vjp.donated == (False,) * (ns + nz + nx + 1) + (True,) * (nd + nz)
    assert step_vjp.inputs[ns + nz + nx] == ((), "int32")  # the step index t
    assert runtime.module_signature(step_vjp.artifact).donated == step_vjp.donated


def test_integer_state_leaves_carry_no_cotangent(lowered):
    _, _, compiled = lowered
    layout = compiled["jax"].layout
    fixed = [(s.path, s.dtype) for s, d in zip(layout.state, layout.differentiable) if not d]
    if len(layout.state) == 13:  # Adam
        assert fixed == [("state[1][0].count", "int32")]
    else:
        assert fixed == []


def maxpool_task():
    return make_task("weights", "sgdm", steps=6, pool="max")


def test_enzyme_names_the_op_it_cannot_differentiate():
    task, z = maxpool_task()
    with pytest.raises(metagrad.EnzymeUnsupportedError, match=r"stablehlo\.select_and_scatter.*max-pooling"):
        task.compile(z, backend="enzyme")


def test_auto_falls_back_to_jax_with_one_line_of_warning():
    task, z = maxpool_task()
    with pytest.warns(UserWarning, match="select_and_scatter.*using JAX's autodiff for step_vjp") as caught:
        compiled = task.compile(z, backend="auto")
    assert all("\n" not in str(w.message) for w in caught)
    assert compiled.programs["step_vjp"].backend == "jax"
    assert compiled.programs["output_vjp"].backend == "jax"  # once per run: JAX's under "auto"


def test_auto_asks_enzyme_for_the_reverses_of_the_step_alone():
    task, z = make_task("weights", "sgdm", steps=6)
    compiled = task.compile(z, backend="auto").prepare(metagrad.Budget(states=2, block=3))
    assert {name: compiled.programs[name].backend for name in ("step_vjp", "segment_vjp_3", "output_vjp",
                                                                "init_vjp")} == {
        "step_vjp": "enzyme", "segment_vjp_3": "enzyme", "output_vjp": "jax", "init_vjp": "jax"}
    enzyme = task.compile(z, backend="enzyme")
    assert enzyme.programs["output_vjp"].backend == enzyme.programs["init_vjp"].backend == "enzyme"


# -- validation: before anything compiles, naming the leaf --------------------

def _task(**changes):
    task, z = make_task("weights", "sgdm", steps=3)
    fields = dict(init=task.init, step=task.step, output=task.output, steps=task.steps, data=task.data)
    fields.update(changes)
    return metagrad.Task(**fields), z


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, 2**31])
def test_steps_must_be_a_positive_int32(steps):
    task, z = _task(steps=steps)
    with pytest.raises(ValueError, match="Task.steps must be an integer >= 1"):
        task.compile(z)


def test_integer_z_is_refused_by_path():
    task, _ = _task()
    with pytest.raises(TypeError, match=r"z\['w'\] has dtype int32"):
        task.compile({"w": np.ones(3, np.int32)})


def test_non_array_leaf_named_by_path():
    task, z = _task()
    with pytest.raises(TypeError, match=r"z\[1\] is a str"):
        task.compile([z, "oops"])


def test_step_failing_on_z_reports_where():
    task, z = _task()
    with pytest.raises(ValueError, match=r"step\(state, z, data, t\).*failed.*Incompatible shapes"):
        task.compile(np.ones((z.shape[0], 3), np.float32))


def test_step_that_changes_a_state_shape():
    base, z = _task()

    def bad_step(state, z, data, t):
        params, opt_state = base.step(state, z, data, t)
        params = dict(params, b2=jnp.zeros(11))
        return params, opt_state

    task, _ = _task(step=bad_step)
    with pytest.raises(ValueError, match=r"step changes state\[0\]\['b2'\] from float32\[10\] to float32\[11\]"):
        task.compile(z)


def test_step_that_changes_the_state_structure():
    base, z = _task()
    task, _ = _task(step=lambda state, z, data, t: base.step(state, z, data, t)[0])
    with pytest.raises(ValueError, match="step changes the structure of the state"):
        task.compile(z)


def test_step_index_must_be_usable():
    base, z = _task()
    task, _ = _task(step=lambda state, z, data, t: (state if int(t) > 0 else state))
    with pytest.raises(ValueError, match=r"t an int32 scalar"):
        task.compile(z)


def test_output_must_be_a_float_scalar_or_vector():
    base, z = _task()
    task, _ = _task(output=lambda state, z, data: state[0]["w1"])
    with pytest.raises(ValueError, match=r"floating-point scalar \(or a vector of m outputs\), got float32\[64, 32\]"):
        task.compile(z)


def test_unknown_backend():
    task, z = _task()
    with pytest.raises(ValueError, match="backend must be one of"):
        task.compile(z, backend="tensorflow")


def test_not_callable():
    task, z = _task(init=3)
    with pytest.raises(TypeError, match="Task.init must be callable"):
        task.compile(z)
