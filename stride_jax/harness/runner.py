"""One runner: a method on a prepared task, in this process or in a fresh one.

`run_method` stores the method's scores and `run.json` (seconds per stage, peak memory) in a
method directory whose identity records the task, the method spec and its STRIDE config, so
a rerun reuses a finished result and a changed config raises instead of mixing results.
With `isolate`, the method runs in a spawned process, so its peak memory is its own: on CPU
the process's peak resident set (VmHWM, reset after loading the model and data; `ru_maxrss`
cannot be used, a spawned child inherits its parent's high-water mark), on an accelerator
the device allocator's `peak_bytes_in_use`.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from stride_jax import store
from stride_jax.scores import Attribution
from stride_jax.config import to_dict
from stride_jax.harness import methods as methods_lib
from stride_jax.harness import tasks as tasks_lib
from stride_jax.harness.config import MethodSpec, task_from_dict

log = logging.getLogger("stride_jax")


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0); False where that is not possible."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def device_peak_bytes() -> int | None:
    import jax

    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return None
    return (dev.memory_stats() or {}).get("peak_bytes_in_use")


def method_identity(task: Any, spec: MethodSpec, stride_cfg: Any) -> dict[str, Any]:
    ident = {"kind": "method-run", "task": to_dict(task), "method": to_dict(spec)}
    if spec.kind == "stride":
        ident["stride"] = to_dict(stride_cfg)
    return ident


def _execute(task: Any, run_dir: Path, spec: MethodSpec, stride_cfg: Any, method_dir: Path, *, measure_memory: bool,
             progress: bool) -> dict[str, Any]:
    """Load model and data, run the method, save its scores; return its timings and memory."""
    import jax

    model, train, queries, _ = tasks_lib.load(task, run_dir)
    loading_peak = status_bytes("VmHWM")
    reset = measure_memory and reset_peak_rss()
    load_rss = status_bytes("VmRSS")
    ctx = methods_lib.Context(stride=stride_cfg, workdir=method_dir, train_cfg=tasks_lib.train_config(task),
                              seed=task.model.seed, progress=progress)
    t0 = time.perf_counter()
    attributor = methods_lib.build(spec.kind, dict(spec.params), ctx, train, model)
    attr = attributor.fit(model, train).attribute(queries)
    seconds = {k: round(float(v), 3) for k, v in getattr(attributor, "timings", {}).items()}
    seconds["total"] = round(time.perf_counter() - t0, 3)
    attr.method = spec.name
    attr.save(method_dir / "scores")
    host_peak, dev_peak = status_bytes("VmHWM"), device_peak_bytes()
    record = {"method": spec.name, "seconds": seconds, "backend": jax.default_backend(),
              "n_train": len(train), "n_queries": len(queries),
              "not_converged": attr.n_not_converged}
    if reset:
        record.update(peak_memory_bytes=dev_peak if dev_peak is not None else host_peak,
                      load_memory_bytes=0 if dev_peak is not None else load_rss, loading_peak_bytes=loading_peak,
                      memory_kind="device peak_bytes_in_use" if dev_peak is not None else "peak RSS while the method ran")
    return record


def _worker(task_dict: dict[str, Any], run_dir: str, spec_dict: dict[str, Any], stride_dict: dict[str, Any],
            method_dir: str) -> None:
    from stride_jax.config import StrideConfig, from_dict

    method_dir_p = Path(method_dir)
    try:
        spec = from_dict(MethodSpec, spec_dict)
        record = _execute(task_from_dict(task_dict), Path(run_dir), spec, StrideConfig.from_dict(stride_dict),
                          method_dir_p, measure_memory=True, progress=False)
        store.write_json(method_dir_p / "run.json", record)
    except ImportError as e:  # an optional dependency (the MiniLM encoder package) is absent
        store.write_json(method_dir_p / "skipped.json", {"method": spec_dict["name"], "reason": str(e)})
    except BaseException:
        store.atomic_write(method_dir_p / "error.txt", traceback.format_exc())
        raise


def run_method(task: Any, run_dir: Path, spec: MethodSpec, stride_cfg: Any, *, isolate: bool = False,
               progress: bool = False) -> tuple[Attribution, dict[str, Any]] | None:
    """(scores, run record) of one method on one prepared task; None when it was skipped.

    Reuses a finished result in `run_dir/methods/<name>`; raises RuntimeError (with the
    child's traceback) when the method fails.
    """
    method_dir = run_dir / "methods" / spec.name
    store.open_dir(method_dir, method_identity(task, spec, stride_cfg), f"run of method {spec.name!r}")
    store.clean_leftovers(method_dir / "scores")  # a killed Attribution.save (the caller holds the run's lock)
    done = method_dir / "run.json"
    finished = _finished(method_dir) if done.exists() else None  # removes a corrupt result: recomputed below
    if finished is not None:
        return finished
    if not done.exists():
        for stale in ("skipped.json", "error.txt"):
            (method_dir / stale).unlink(missing_ok=True)
        if isolate:
            ctx = multiprocessing.get_context("spawn")
            proc = ctx.Process(target=_worker, args=(to_dict(task), str(run_dir), to_dict(spec), to_dict(stride_cfg),
                                                     str(method_dir)))
            proc.start()
            proc.join()
            if proc.exitcode != 0 or not (done.exists() or (method_dir / "skipped.json").exists()):
                err = method_dir / "error.txt"
                detail = err.read_text()[-3000:] if err.exists() else f"exit code {proc.exitcode}"
                raise RuntimeError(f"method {spec.name!r} failed in {method_dir}:\n{detail}")
        else:
            try:
                store.write_json(done, _execute(task, run_dir, spec, stride_cfg, method_dir, measure_memory=False,
                                                progress=progress))
            except ImportError as e:
                store.write_json(method_dir / "skipped.json", {"method": spec.name, "reason": str(e)})
    if (method_dir / "skipped.json").exists():
        reason = json.loads((method_dir / "skipped.json").read_text())["reason"]
        log.warning("method %s skipped: %s", spec.name, reason)
        return None
    return _load(method_dir)


def stored_result(task: Any, run_dir: Path, spec: MethodSpec, stride_cfg: Any
                  ) -> tuple[Attribution, dict[str, Any]] | None:
    """The finished (scores, run record) of `spec` stored in `run_dir/methods/<name>` for these
    inputs; None when there is none, it was made from other inputs, or it is unreadable. Writes
    nothing (a `--methods` run reads the other rows' scores with it)."""
    method_dir = run_dir / "methods" / spec.name
    if not (method_dir / "run.json").exists():
        return None
    try:
        store.check_identity(method_dir, method_identity(task, spec, stride_cfg), f"run of method {spec.name!r}")
        return _load(method_dir)
    except (OSError, ValueError):
        return None


def _load(method_dir: Path) -> tuple[Attribution, dict[str, Any]]:
    """The (scores, run record) stored in a method's directory (OSError / ValueError when unreadable)."""
    return Attribution.load(method_dir / "scores"), store.read_json(method_dir / "run.json")


def _finished(method_dir: Path) -> tuple[Attribution, dict[str, Any]] | None:
    """The stored (scores, run record) of a finished method run; None, after removing both,
    when either is unreadable or corrupt, so the caller recomputes them (they are derived)."""
    try:
        return _load(method_dir)
    except (OSError, ValueError) as e:
        log.warning("the stored result in %s is unreadable (%s); recomputing it", method_dir,
                    str(e).splitlines()[0])
        (method_dir / "run.json").unlink(missing_ok=True)
        shutil.rmtree(method_dir / "scores", ignore_errors=True)
        return None
