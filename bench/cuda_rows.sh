#!/usr/bin/env bash
# The frontier's rows on an NVIDIA GPU, through the CUDA plugin of jax-cuda13-pjrt.
#
# For a machine that has the GPU, python3 with jax, jax-cuda13-pjrt, equinox,
# nanobind, CMake and ninja, but no enzyme-ad (the device tool's H200 image:
# Python 3.12, jax 0.11.2). The tasks are compiled with Enzyme elsewhere and
# saved, with the PJRT C API header, under .device/ (ignored by git):
#
#   python bench/frontier.py --kinds mlp_table,transformer --steps 1000 --scan-form \
#       --save-tasks .device/tasks
#   cp "$(python -c 'import os, xla_plugins.xla_cpu_pjrt as p; print(os.path.dirname(p.__file__))')"/include/pjrt_c_api.h \
#       .device/include/
#
# then, on the GPU's machine, from the repository's root:
#
#   bench/cuda_rows.sh OUT_DIR STAGE...     stages: info build check:KIND harness tests frontier:KIND
#
# `build` compiles the runtime (_runtime, metagrad-bench) for that python into
# /tmp/metagrad-build and puts _runtime beside the package's sources;
# `check:KIND` compares the saved task's metagradient with JAX's on the GPU
# (bench/saved_task_check.py) and ends the script if they differ; `harness`
# runs metagrad-bench on each saved task; `tests` the runtime's tests on the
# GPU; `frontier:KIND` that task's frontier row at T = 1000 without the fixed
# schedules (but the default) and Python REPLAY, to fit a short lease. Each
# stage has its own time limit and its log in OUT_DIR (few files: the device
# tool returns eight); only a failed check stops the stages after it.
set -u
out=${1:?usage: bench/cuda_rows.sh OUT_DIR STAGE...}
shift
mkdir -p "$out"
root=$(pwd)
py=${PYTHON:-$(command -v python3)}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export METAGRAD_CACHE_DIR=/tmp/metagrad-cache
# The jitted peers' yardstick (JAX's training) compiles once for all cells.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export PYTHONPATH="$root/python:$root/bench:$root/tests"
plugin=${METAGRAD_PJRT_PLUGIN:-$("$py" -c "import importlib.util as u, os; print(os.path.join(list(u.find_spec('jax_plugins.xla_cuda13').submodule_search_locations)[0], 'xla_cuda_plugin.so'))")}
export METAGRAD_PJRT_PLUGIN=$plugin
# metagrad-bench has no python to preload cuDNN, cuBLAS...: the loader finds them in the nvidia-* wheels.
site=$("$py" -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))" 2>/dev/null)
export LD_LIBRARY_PATH="$(ls -d "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"

stage() { echo "=== $1 ($(date +%T))"; }
harness=/tmp/metagrad-build/metagrad-bench

for what in "$@"; do
  case $what in
    info)
      stage info
      nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem --format=csv
      "$py" -c "import sys, jax, jaxlib; print(sys.version.split()[0], jax.__version__, jaxlib.__version__, jax.devices())"
      echo "plugin $plugin"; nproc; uptime
      ;;
    build)
      stage build
      # nanobind as here (.device/whl, if carried); XLA's FFI header from that jaxlib, else the one carried.
      ls "$root"/.device/whl/nanobind-*.whl > /dev/null 2>&1 \
        && "$py" -m pip install -q --no-index --no-deps --target /tmp/nanobind "$root"/.device/whl/nanobind-*.whl \
        && export PYTHONPATH="/tmp/nanobind:$PYTHONPATH"
      for ffi in "" "-DXLA_FFI_INCLUDE_DIR=$root/.device/ffi_include"; do
        rm -rf /tmp/metagrad-build
        (cmake -S . -B /tmp/metagrad-build -G Ninja -DPython_EXECUTABLE="$py" \
           -DPJRT_INCLUDE_DIR="$root/.device/include" $ffi \
           && timeout 150 ninja -C /tmp/metagrad-build _runtime metagrad-bench) > "$out/build.log" 2>&1
        rc=$?; echo "build ${ffi:-with the FFI header of this jaxlib} rc=$rc"; tail -3 "$out/build.log"
        [ $rc = 0 ] && break
        cp "$out/build.log" "$out/build_failed.log"
      done
      cp /tmp/metagrad-build/_runtime*.so python/metagrad/ && "$py" -c "import metagrad; print('metagrad', metagrad.__version__)"
      ;;
    harness)
      stage harness
      [ -x "$harness" ] || harness=$root/.device/metagrad-bench  # built elsewhere, if the build failed
      for task in "$root"/.device/tasks/*-1000; do
        name=$(basename "$task")
        timeout 50 "$harness" "$task" --plugin "$plugin" --schedule none,storeall,replay:4,replay:16:10,replay:64:10 \
          --repeat 5 --dispatch-iters 2000 --json > "$out/harness_$name.json" 2> /tmp/harness.err
        echo "$name rc=$?"; grep -v -E "ptxas|^$" /tmp/harness.err | tail -c 600 | tee -a "$out/harness.err"
        "$py" -c "import json, sys; d = json.load(open(sys.argv[1])); print(d['info']['platform'], 'train', d['train']['us_per_step_median'], 'us/step; dispatch', d['dispatch']); [print(' ', m['schedule'], m['seconds']['median'], 's', m.get('ratio_to_train')) for m in d['metagradient']]" "$out/harness_$name.json"
      done
      ;;
    check:*)
      # The saved task's metagradient against JAX's on the GPU; a failure ends the script (nothing after
      # it could be trusted, and the device time is better kept for a fixed run).
      # Loading compiles every program of the task (both forms) into the disk cache, so that the frontier's
      # cells, each limited to 60 s, find them there: the transformer's take about 77 s on the CPU plugin.
      kind=${what#check:}
      for form in "" -scan; do
        stage "check $kind$form"
        timeout 300 "$py" bench/saved_task_check.py "$kind" 1000 "$root/.device/tasks/$kind-1000$form" \
          > "$out/check_$kind$form.log" 2>&1
        rc=$?; echo "check $kind$form rc=$rc"
        grep -v -E "^(WARNING|I0000|W0000)" "$out/check_$kind$form.log" | tail -25 | cut -c1-700
        [ $rc = 0 ] || { stage "end (check failed)"; exit 1; }
      done
      ;;
    tests)
      stage tests
      timeout 60 "$py" -m pytest -q -p no:cacheprovider tests/test_runtime.py \
        > "$out/tests.log" 2>&1
      echo "tests rc=$?"; grep -E "^(FAILED|ERROR|E  )|passed|failed" "$out/tests.log" | cut -c1-300 | tail -40
      ;;
    frontier:*)
      kind=${what#frontier:}
      stage "frontier $kind"
      timeout 170 "$py" bench/frontier.py --kinds "$kind" --steps 1000 --scan-form --tasks-from "$root/.device/tasks" \
        --skip metagrad,python_replay --repeat 3 --timeout 60 --mem-limit-gb 40 --out "$out/frontier_cuda_$kind" \
        > "$out/frontier_$kind.log" 2>&1
      echo "frontier $kind rc=$?"; cut -c1-160 "$out/frontier_$kind.log" | tail -45
      ;;
    *) echo "unknown stage $what"; exit 2 ;;
  esac
done
stage end
