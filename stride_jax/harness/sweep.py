"""One variant sweep: STRIDE under many settings, sharing operator fits and measurements.

Variants whose design, steering and fit settings are equal share one fit (in
`workdir/<fit hash>`) and one measurement of the queries (cached there); each then differs
only in centring and recovery, applied through `Stride.with_config`, so no live `Stride` is
ever mutated. A variant whose settings are invalid for the pool (a grid corner with K > n d)
is skipped with the reason; one whose fit diverges is recorded as failed. Everything resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from stride_jax import store
from stride_jax.attribution import Attribution, Stride
from stride_jax.config import StrideConfig
from stride_jax.fit import fit_settings
from stride_jax.measure import Measurement, average


@dataclasses.dataclass
class VariantResult:
    name: str
    cfg: StrideConfig | None
    attr: Attribution | None
    seconds: dict[str, float]
    error: str | None = None
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # peak / load RSS of its fit + measure


def fit_key(cfg: StrideConfig) -> str:
    """The sweep folder of `cfg`'s fit: variants with the same fit settings share it."""
    return store.fingerprint(fit_settings(cfg))[:12]


def _fit_and_measure(prepared: Any, cfg: StrideConfig, fit_dir: Path,
                     progress: bool) -> tuple[Stride, Measurement, dict, dict]:
    """(fit, measurement, seconds, memory); seconds and memory are the first run's (a resumed fit
    reports those, not the time of reloading it). Memory: this process's resident set when the fit
    began ("load_memory_bytes": the harness with data, model and ground truth) and its peak while
    the fit and measurement ran ("peak_memory_bytes", VmHWM reset first; Linux only)."""
    from stride_jax.harness.runner import reset_peak_rss, status_bytes

    seconds_path, memory_path = fit_dir / "seconds.json", fit_dir / "memory.json"
    recorded = store.read_json(seconds_path) if seconds_path.exists() else None
    fresh = recorded is None
    can_reset = fresh and reset_peak_rss()
    load = status_bytes("VmRSS")
    t0 = time.perf_counter()
    stride = Stride(cfg).fit(prepared.model, prepared.train, workdir=fit_dir, progress=progress)
    t1 = time.perf_counter()
    m, _ = _measurement(prepared, stride, fit_dir, progress)
    seconds = recorded or {"fit": round(t1 - t0, 3), "measure": round(time.perf_counter() - t1, 3)}
    if fresh:
        store.write_json(seconds_path, seconds)  # the first run's timings, reported on resume too
        if can_reset and load is not None:
            store.write_json(memory_path, {"peak_memory_bytes": status_bytes("VmHWM"), "load_memory_bytes": load})
    memory = store.read_json(memory_path) if memory_path.exists() else {}
    return stride, m, seconds, memory


def _measurement(prepared: Any, stride: Stride, fit_dir: Path, progress: bool) -> tuple[Measurement, float | None]:
    """The queries' raw losses under `stride`'s measurement mode and the seconds they took (None
    when cached by an older run), cached per (queries, mode) in the fit's directory (the exact
    mode keeps the file name earlier runs wrote)."""
    mode = getattr(stride.cfg.measure, "mode", "exact")
    suffix = "" if mode == "exact" else f"_{mode}"
    cache = fit_dir / f"measure_{prepared.queries.content_hash()[:16]}{suffix}.npz"
    if cache.exists():
        z = store.load_npz(cache)
        return Measurement(z["base"], z["steered"]), float(z["seconds"]) if "seconds" in z else None
    t0 = time.perf_counter()
    m = stride.measure(prepared.queries, progress=progress)
    seconds = round(time.perf_counter() - t0, 3)
    store.save_npz(cache, {"base": m.base_loss_Q, "steered": m.steered_loss_QxK, "seconds": seconds})
    return m, seconds


def _member_fits(prepared: Any, cfg: StrideConfig, workdir: Path, fits: dict[str, Any],
                 progress: bool) -> list[tuple[StrideConfig, Path, tuple[Stride, Measurement, dict, dict]]] | str:
    """(member config, its folder, its fit) for each single fit of `cfg` (one, or `fit.ensemble`
    of them), each shared through `fits` with every variant of the same fit settings; or the
    reason one failed."""
    out = []
    for member in cfg.ensemble_members():
        key = fit_key(member)
        if key not in fits:
            try:
                fits[key] = _fit_and_measure(prepared, member, workdir / key, progress)
            except store.IdentityError:
                raise
            except (FloatingPointError, ValueError) as e:
                fits[key] = f"{type(e).__name__}: {e}"
        if isinstance(fits[key], str):
            return fits[key]
        out.append((member, workdir / key, fits[key]))
    return out


def run_variants(prepared: Any, configs: dict[str, StrideConfig | str], workdir: Path, *,
                 progress: bool = False) -> dict[str, VariantResult]:
    """Scores of every variant on all of `prepared`'s queries (a config, or the reason it is invalid).
    A variant with `fit.ensemble` > 1 measures each member fit (shared with the single-fit
    variants of its seed) and recovers once from their averaged responses."""
    fits: dict[str, tuple[Stride, Measurement, dict, dict] | str] = {}
    out: dict[str, VariantResult] = {}
    for name, cfg in configs.items():
        if isinstance(cfg, str):
            out[name] = VariantResult(name, None, None, {}, error=f"skipped: {cfg}")
            continue
        members = _member_fits(prepared, cfg, workdir, fits, progress)
        if isinstance(members, str):
            out[name] = VariantResult(name, cfg, None, {}, error=members)
            continue
        strides, ms, seconds, memory = [], [], {}, {}
        for member_cfg, fit_dir, (stride, m, member_seconds, member_memory) in members:
            if member_memory.get("peak_memory_bytes", 0) >= memory.get("peak_memory_bytes", 0):
                memory = member_memory
            variant = stride.with_config(member_cfg)
            member_seconds = dict(member_seconds)
            if getattr(cfg.measure, "mode", "exact") != getattr(stride.cfg.measure, "mode", "exact"):
                m, member_seconds["measure"] = _measurement(prepared, variant, fit_dir, progress)  # same operators
            strides.append(variant)
            ms.append(m)
            for stage, s in member_seconds.items():  # an ensemble's stages take its members' seconds together
                seconds[stage] = None if s is None or seconds.get(stage, 0) is None else seconds.get(stage, 0) + s
        variant = strides[0] if len(strides) == 1 else Stride.from_members(cfg, strides)
        m = ms[0] if len(ms) == 1 else average(ms, cfg.measure)
        t0 = time.perf_counter()
        attr = variant.recover(variant.responses(m), prepared.queries.ids)
        out[name] = VariantResult(name, variant.cfg, attr, {**seconds, "recover": round(time.perf_counter() - t0, 3)},
                                  memory=memory)
    return out


def variant_configs(base: StrideConfig, variants: dict[str, dict[str, Any]], group: dict[str, Any] | None = None,
                    n_train: int | None = None) -> dict[str, StrideConfig | str]:
    """{name: config} of each variant (base + group overrides + variant overrides), or the
    reason a grid corner is invalid for a pool of `n_train` examples."""
    out: dict[str, StrideConfig | str] = {}
    for name, override in variants.items():
        try:
            cfg = base.replace(**(group or {})).replace(**override)
        except ValueError as e:
            out[name] = str(e)
            continue
        if n_train is not None:
            cfg = cfg.resolve_subsets(n_train)
        d = cfg.design
        if n_train is not None and n_train * d.per_example < d.n_subsets:
            out[name] = f"K={d.n_subsets} > n d = {n_train * d.per_example}"
            continue
        out[name] = cfg
    return out


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []
