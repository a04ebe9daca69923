"""Two processes under `jax.distributed` split one ground-truth sweep; the result equals one process.

Each process (CPU, one device, on localhost) opens the same store and runs
`run_groundtruth` with jax's process index and count: process i trains the chunks c with
c % 2 == i, holds a lock on its own share only, and waits for the other at a barrier, after
which both see the complete store. The test is skipped (with the reason) when
`jax.distributed` cannot start here; every wait has a timeout, so it cannot hang.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from stride_jax import groundtruth, store as store_lib
from stride_jax.groundtruth import GroundTruthStore

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

SETUP = textwrap.dedent('''
    import numpy as np
    from stride_jax import models, train
    from stride_jax.data import Examples
    from stride_jax.groundtruth import GroundTruthConfig

    def setup():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(48, 5)).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
        train_ex = Examples(inputs=x[:40], targets=y[:40], ids=np.arange(40))
        query_ex = Examples(inputs=x[40:], targets=y[40:], ids=np.arange(40, 48))
        cfg = GroundTruthConfig(n_subsets=4, alpha=0.5, seeds_per_subset=1, models_per_chunk=1)
        model_cfg = models.MLPConfig(in_dim=5, hidden=(8,), n_classes=2)
        train_cfg = train.TrainConfig(batch_size=8, epochs=2, learning_rate=1e-2, scan_steps=8)
        return cfg, model_cfg, train_cfg, train_ex, query_ex
''')

WORKER = SETUP + textwrap.dedent('''
    import json, sys
    import jax
    port, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                                   initialization_timeout=60)
    except Exception as e:  # reported to the test, which skips
        print("INIT_FAILED", type(e).__name__, str(e).replace("\\n", " ")[:300], flush=True)
        sys.exit(3)
    from stride_jax import groundtruth
    cfg, model_cfg, train_cfg, train_ex, query_ex = setup()
    store = groundtruth.GroundTruthStore.create_or_open(path, cfg, model_cfg, train_cfg, train_ex, query_ex)
    written, write = [], store.write_chunk
    store.write_chunk = lambda *a: written.append(write(*a).name) or written[-1]
    groundtruth.run_groundtruth(store, model_cfg, train_cfg, train_ex, query_ex, progress=False)
    print("RESULT", json.dumps({"process": jax.process_index(), "count": jax.process_count(), "written": written,
                                "complete": store.is_complete(), "devices": len(jax.local_devices())}), flush=True)
    jax.distributed.shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _setup():
    ns: dict = {}
    exec(SETUP, ns)
    return ns["setup"]()


@pytest.mark.slow  # two fresh interpreters importing jax and compiling: ~35 s on 2 busy cores
def test_two_processes_split_the_groundtruth_sweep(tmp_path):
    cfg, model_cfg, train_cfg, train_ex, query_ex = _setup()
    shared = tmp_path / "shared"
    GroundTruthStore.create_or_open(shared, cfg, model_cfg, train_cfg, train_ex, query_ex)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "XLA_FLAGS": ""}  # one CPU device per process
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(shared)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = [proc.communicate()[0][-2000:] for proc in procs]
        pytest.fail(f"the two processes did not finish within {TIMEOUT_S} s; logs: {logs}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [line for out in outputs for line in out.splitlines() if line.startswith("INIT_FAILED")]
    if failed:
        pytest.skip(f"jax.distributed cannot start on this machine: {failed[0]}")
    results = [json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT")]
    assert [p.returncode for p in procs] == [0, 0] and len(results) == 2, [o[-3000:] for o in outputs]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["count"] == 2 and r["devices"] == 1 and r["complete"] for r in results), results  # after the barrier
    for r in results:  # process i wrote exactly the chunks c with c % 2 == i
        assert r["written"] == [f"chunk_{c}_{c + 1}.npz" for c in range(r["process"], 4, 2)], results

    combined = GroundTruthStore.open(shared)
    assert sorted(p.name for p in shared.glob("chunk_*.npz")) == [f"chunk_{c}_{c + 1}.npz" for c in range(4)]
    assert sorted(p.name for p in (shared / groundtruth._SHARES).iterdir()) == ["0-of-2", "1-of-2"]
    assert not (shared / store_lib.LOCK_FILE).exists()  # the cooperative writers took no store-wide lock

    single = GroundTruthStore.create_or_open(tmp_path / "single", cfg, model_cfg, train_cfg, train_ex, query_ex)
    groundtruth.run_groundtruth(single, model_cfg, train_cfg, train_ex, query_ex, progress=False, process_index=0,
                                process_count=1)
    # One program (M = 1 on one CPU device) in both runs: bitwise equal losses.
    np.testing.assert_array_equal(combined.losses(), single.losses())
    assert np.isfinite(single.losses()).all() and not np.allclose(single.losses()[0], single.losses()[1])
