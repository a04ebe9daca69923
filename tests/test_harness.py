"""The harness: every paper config runs through one pipeline; runs resume after kill -9 with
bitwise-equal scores; bad configs fail before any work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stride_jax import cli
from stride_jax.harness import load_config
from stride_jax.harness.config import ExperimentConfig
from stride_jax.harness import report as report_lib

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"

TINY = {
    "name": "tiny",
    "n_boot": 50,
    "task": {"kind": "lm", "data": {"train_per_source": 16, "val_queries_per_source": 2, "test_queries_per_source": 3,
                                    "seq_len": 16},
             "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
             "pretrain": {"epochs": 1.0, "batch_size": 8}, "retrain": {"epochs": 1.0, "batch_size": 8},
             "groundtruth": {"n_subsets": 6, "seeds_per_subset": 2, "models_per_chunk": 3}},
    "stride": {"design": {"n_subsets": 24, "per_example": 4}, "steering": {"rank": 1},
               "fit": {"steps": 40, "subsets_per_step": 8, "checkpoint_every": 5}},
    "methods": ["stride", "random"],
    "variants": {"base": {}, "lambda 0.2": {"recovery": {"lambda_frac": 0.2}}, "K 12": {"design": {"n_subsets": 12}}},
}


def test_every_shipped_config_loads_and_validates():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert {"pretrain_lds.yaml", "small_models.yaml", "lm_tuning.yaml", "ablations_lm.yaml"} <= set(names)
    for name in names:
        load_config(CONFIGS / name)
    for name in ("demo", "quick"):
        load_config(name)


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (README)
def test_pretrain_smoke_runs_isolated_methods_and_cost_in_n(tmp_path):
    assert cli.main(["run", str(CONFIGS / "pretrain_lds_smoke.yaml"), "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "pretrain_lds_smoke.json").read_text())
    rows = {(r["cell"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(c, m) for c in ("xs", "s") for m in ("stride", "graddot")}
    for r in rows.values():
        assert r["peak_memory_bytes"] > r["load_memory_bytes"] > 0  # measured in the method's own process
        assert r["seconds"]["total"] > 0 and -1 <= r["lds"]["mean"] <= 1
        assert r["dataset"].startswith("corpus (")
    assert set(rows[("xs", "stride")]["seconds"]) >= {"fit", "measure", "recover"}
    assert {(r["method"], r["n"]) for r in report["cost_n"]} == {("graddot", 36), ("graddot", 72)}
    md = (tmp_path / "run" / "pretrain_lds_smoke.md").read_text()
    assert "The paper's table" in md and "Cost growth with n" in md
    assert (tmp_path / "run" / "pretrain_lds_smoke.png").stat().st_size > 1000


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (README)
def test_small_models_smoke_selects_on_validation_and_checks_counterfactually(tmp_path):
    assert cli.main(["run", str(CONFIGS / "small_models_smoke.yaml"), "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "small_models_smoke.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    assert {"stride-logits", "stride-residual", "tracin", "trak", "random"} == methods
    assert {r["alpha"] for r in report["rows"]} == {0.3, 0.5}
    assert {s["group"] for s in report["selection"]} == {"logits", "residual"}
    assert all("lds_test" not in v for v in report["variants"])  # selection never looks at test queries
    assert [v["variant"] for v in report["variants"] if v["group"] == "residual"] == ["default"]
    cf = report["counterfactual"][0]
    assert cf["ks"] == [3, 10] and {"stride-logits", "random"} <= set(cf["summary"])
    assert (tmp_path / "run" / cf["png"]).exists()


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (README)
def test_ablation_grid_skips_invalid_corners(tmp_path):
    assert cli.main(["run", str(CONFIGS / "small_models_ablation_smoke.yaml"), "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "small_models_ablation_smoke.json").read_text())
    names = [v["variant"] for v in report["variants"]]
    assert names == ["n_subsets=12 per_example=1", "n_subsets=12 per_example=2", "n_subsets=24 per_example=1",
                     "n_subsets=24 per_example=2"]
    assert all("lds_test" in v and "lds_val" in v for v in report["variants"] if not v["error"])


def _run(out: Path, config: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "stride_jax.cli", "run", str(config), "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting to kill the run")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _scores(out: Path) -> dict:
    found = {}
    for p in sorted(out.rglob("scores.npz")):
        with np.load(p) as z:
            found[str(p.relative_to(out))] = z["scores"]
    return found


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (README)
def test_kill_minus_nine_mid_groundtruth_and_mid_fit_resumes_bitwise(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    straight = tmp_path / "straight"
    assert _run(straight, config).wait() == 0
    killed = tmp_path / "killed"
    # kill 1: after the first ground-truth chunk (of 4) is on disk
    _kill_when(_run(killed, config), lambda: any((killed / "groundtruth").glob("chunk_*.npz")))
    # kill 2: in the middle of the variant sweep's first fit (a checkpoint exists, the fit is not done)
    _kill_when(_run(killed, config), lambda: any((killed / "sweep").glob("*/*/checkpoints/step_*")))
    # kill 3: in the middle of the STRIDE method's operator fit
    _kill_when(_run(killed, config), lambda: any((killed / "methods" / "stride" / "fit" / "checkpoints").glob("step_*")))
    assert not (killed / "methods" / "stride" / "run.json").exists()
    proc = _run(killed, config)
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    a, b = _scores(straight), _scores(killed)
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ra = json.loads((straight / "tiny.json").read_text())
    rb = json.loads((killed / "tiny.json").read_text())
    assert [r["lds"] for r in ra["rows"]] == [r["lds"] for r in rb["rows"]]
    assert [v.get("lds_val") for v in ra["variants"]] == [v.get("lds_val") for v in rb["variants"]]
    assert not list(killed.rglob(".tmp-*"))  # leftovers of the killed writes were cleaned


def test_second_process_on_the_same_out_dir_is_refused(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "variants": {}}))
    first = _run(tmp_path / "out", config)
    deadline = time.monotonic() + 300
    while not (tmp_path / "out" / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = _run(tmp_path / "out", config)
    _, err = second.communicate(timeout=300)
    first.kill()
    first.wait()
    assert second.returncode == 2 and b"in use by another process" in err


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(methods=["stride", "gradot"]), "unknown method 'gradot'"),
    (lambda c: c["stride"]["fit"].update(stepz=3), r"unknown field\(s\) \['stepz'\]"),
    (lambda c: c["stride"]["fit"].update(steps="many"), "fit.steps must be an integer"),
    (lambda c: c["task"]["groundtruth"].update(alpha=1.5), "alpha"),
    (lambda c: c.update(cells=[{"name": "a"}, {"name": "a"}]), "unique"),
    (lambda c: c["task"].update(kind="vision"), "task.kind"),
    (lambda c: c.update(methods=[{"name": "x", "method": "stride", "cells": ["nope"]}]), "unknown cells"),
    (lambda c: c["variants"].update(bad={"fit": {"learning_rate": -1}}), "variant 'bad'"),
    (lambda c: c.update(cells=[{"name": "a", "groups": {"K=n": None}}]), r"unknown select groups \['K=n'\]"),
    (lambda c: c.update(methods=[{"name": "s", "method": "stride", "stride": {"preset": "llm-fast"}}]),
     "method 's': unknown preset 'llm-fast'"),
])
def test_bad_configs_fail_before_any_work(tmp_path, capsys, mutate, match):
    cfg = json.loads(json.dumps(TINY))
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stride-jax: error:"), err
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_yaml_syntax_and_missing_file_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert cli.main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["run", "quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_experiment_config_round_trip():
    cfg = load_config(CONFIGS / "pretrain_lds.yaml")
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    assert [m.name for m in cfg.methods if m.cells] == ["stride-tuned"]
    assert cfg.stride_for("2.2M", next(m for m in cfg.methods if m.name == "stride-tuned")).fit.learning_rate == 0.003


def test_a_method_row_may_start_from_a_preset():
    """`stride: {preset: llm}` in a method row starts from that preset instead of the experiment's
    stride section; the cell's overrides and the row's other fields still apply on top."""
    from stride_jax.config import StrideConfig

    cfg = json.loads(json.dumps(TINY))
    cfg["cells"] = [{"name": "a", "stride": {"steering": {"rank": 2}}}]
    cfg["methods"] = [{"name": "stride-llm", "method": "stride", "stride": {"preset": "llm", "fit": {"checkpoint_every": 7}}},
                      {"name": "stride-own", "method": "stride", "stride": {"fit": {"checkpoint_every": 7}}}]
    exp = ExperimentConfig.from_dict(cfg)
    llm, own = exp.methods
    want = StrideConfig.preset("llm").replace(steering={"rank": 2}, fit={"checkpoint_every": 7})
    assert exp.stride_for("a", llm) == want
    assert exp.stride_for("a", own) == exp.stride.replace(steering={"rank": 2}, fit={"checkpoint_every": 7})
    assert want.recovery.prior == "features" and exp.stride.recovery.prior != "features"
    assert ExperimentConfig.from_dict(exp.to_dict()) == exp


def _fake_report(cells):
    """A minimal harness report: cells [(name, params, n)], stride 10 s everywhere, graddot 1 s * n / 100."""
    gt = {"0.3": {"n_subsets": 8, "seeds_per_subset": 2}}
    ceil = {"0.3": {"mean": 0.5, "ci95": [0.4, 0.6], "ceiling_for_seed_average": 0.6}}
    rows = [{"method": m, "cell": c, "alpha": 0.3, "lds": {"mean": 0.1, "ci95": [0.0, 0.2]},
             "seconds": {"total": 10.0 if m == "stride" else n / 100}, "peak_memory_bytes": 2**30 * n / 100,
             "load_memory_bytes": 2**29}
            for c, _, n in cells for m in ("stride", "graddot")]
    return {"config": {"name": "x"}, "machine": "m", "date": "d", "rows": rows,
            "cells": [{"cell": c, "params": p, "n_train": n, "groundtruth": gt, "noise_ceiling": ceil,
                       "base_test_loss": 1.0} for c, p, n in cells]}


def test_report_cost_growth_follows_n_within_a_size_and_parameters_across_sizes():
    md = report_lib.markdown(_fake_report([("s-n100", 1000, 100), ("s-n400", 1000, 400), ("l-n100", 9000, 100)]),
                             "cmd")
    assert "## Cost growth from s-n100 to s-n400 (n 100 -> 400, 4x; 1,000 parameters)" in md
    assert "| graddot | 1.0 | 4.0 | 4.00 | 4.00 |" in md and "| stride | 10.0 | 10.0 | 1.00 | 4.00 |" in md
    assert "l-n100 to" not in md  # a size with one n has no growth row
    md = report_lib.markdown(_fake_report([("s", 1000, 100), ("l", 9000, 100)]), "cmd")
    assert "## Cost growth from s to l (9.0x parameters)" in md


def test_cells_option_runs_a_subset_of_cells(capsys):
    """`stride-jax run --cells` keeps the named cells (and the methods that run in them); an unknown
    name is a one-line error before any work."""
    args = cli.build_parser().parse_args(["run", str(CONFIGS / "nk_regime.yaml"), "--cells", "0.2M-n768,0.2M-n3072"])
    cfg = cli._experiment(args)
    assert [c.name for c in cfg.cells] == ["0.2M-n768", "0.2M-n3072"]
    assert {m.name for m in cfg.methods} == {m.name for m in load_config(CONFIGS / "nk_regime.yaml").methods}
    assert cli.main(["run", str(CONFIGS / "nk_regime.yaml"), "--cells", "0.2M-n768,huge", "--no-progress"]) == 2
    assert "unknown cell(s) ['huge']" in capsys.readouterr().err
    cfg = cli._experiment(cli.build_parser().parse_args(["run", str(CONFIGS / "pretrain_lds.yaml"), "--cells", "0.2M"]))
    assert all(not m.cells or m.cells == ("0.2M",) for m in cfg.methods)
    assert "stride-tuned" not in {m.name for m in cfg.methods}  # limited to 2.2M: left out with it


def test_results_of_other_cells_are_kept_when_running_some_cells():
    """A `--cells` run rewrites its own cells' entries and keeps the other cells' (from the results
    file's previous version, in the config's cell order, with where they come from); a results
    file of a different experiment is refused."""
    full = {"name": "x", "cells": [{"name": c} for c in ("a", "b", "c")], "task": {"kind": "lm", "lr": 1.0}}
    earlier = {**_fake_report([("a", 1000, 100), ("b", 1000, 400)]), "config": {**full, "cells": full["cells"][:2]},
               "command": "stride-jax run x --cells a,b"}
    now = _fake_report([("b", 1000, 400), ("c", 9000, 100)])
    for r in now["rows"]:
        r["lds"] = {"mean": 0.3, "ci95": [0.2, 0.4]}
    merged = report_lib.merge_earlier(now, earlier, full)
    assert [c["cell"] for c in merged["cells"]] == ["a", "b", "c"]
    assert [(r["cell"], r["lds"]["mean"]) for r in merged["rows"]] == [
        ("a", 0.1), ("a", 0.1), ("b", 0.3), ("b", 0.3), ("c", 0.3), ("c", 0.3)]
    assert merged["earlier_cells"] == [{"cell": "a", "command": "stride-jax run x --cells a,b", "machine": "m",
                                        "date": "d"}]
    assert "Cells a are kept from an earlier run: `stride-jax run x --cells a,b`" in report_lib.markdown(merged, "cmd")
    again = report_lib.merge_earlier(_fake_report([("c", 9000, 100)]), merged, full)  # provenance carries over
    assert again["earlier_cells"][0]["command"] == "stride-jax run x --cells a,b"
    assert [c["cell"] for c in again["earlier_cells"]] == ["a", "b"]
    with pytest.raises(ValueError, match=r"differs in \['task.lr'\]"):
        report_lib.merge_earlier(now, earlier, {**full, "task": {"kind": "lm", "lr": 2.0}})
    only = lambda names: {**full, "select": {"only": {"g": names}}}  # a group's grid may grow, not change
    report_lib.check_earlier({**earlier, "config": only(["a", "b"])}, only(["b", "a", "c"]))
    with pytest.raises(ValueError, match=r"differs in \['select.only.g'\]"):
        report_lib.check_earlier({**earlier, "config": only(["a", "b"])}, only(["a", "c"]))
    with pytest.raises(ValueError, match="holds experiment 'x'"):
        report_lib.merge_earlier(now, earlier, {**full, "name": "y"})
    # which rows a contamination entry fuses (their names say it) may change; how recall is measured not
    cont = lambda **kw: {**full, "contamination": {"fuse": ["a", "b"], "fusions": ["min-rank"], "buckets": [0.01], **kw}}
    report_lib.check_earlier({**earlier, "config": cont()}, cont(fuse=["c", "b"], fusions=["rank-mean"]))
    with pytest.raises(ValueError, match=r"differs in \['contamination.buckets'\]"):
        report_lib.check_earlier({**earlier, "config": cont()}, cont(buckets=[0.02]))
    args = cli.build_parser().parse_args(["run", str(CONFIGS / "nk_regime.yaml"), "--cells", "0.2M-n768"])
    cfg, whole = cli._experiment(args, whole=True)
    assert len(whole.cells) == 5 and len(cfg.cells) == 1
    assert cli._experiment(cli.build_parser().parse_args(["run", str(CONFIGS / "nk_regime.yaml")]), whole=True)[1] is None


def test_a_methods_run_replaces_its_rows_and_keeps_the_others_with_their_origin(capsys):
    """`--methods graddot` in cell a rewrites a's graddot rows only: STRIDE's rows, variants and
    the qualitative entries (derived from several methods, not recomputed) stay from the earlier
    run, which the markdown names; a later full run of the cell drops that provenance, and
    recomputed qualitative entries replace the earlier ones."""
    full = {"name": "x", "cells": [{"name": c} for c in ("a", "b")], "task": {"kind": "lm"},
            "methods": [{"name": "graddot"}]}
    earlier = {**_fake_report([("a", 1000, 100), ("b", 1000, 100)]), "config": full, "command": "first",
               "variants": [{"cell": "a", "group": "", "variant": "v", "override": {}, "seconds": {"fit": 1.0},
                             "lds_val": {"mean": 0.2, "ci95": [0.1, 0.3]}}], "qualitative": [{"cell": "a", "query": "q"}]}
    now = _fake_report([("a", 1000, 100)])
    now["rows"] = [r for r in now["rows"] if r["method"] == "graddot"]
    for r in now["rows"]:
        r["lds"] = {"mean": 0.3, "ci95": [0.2, 0.4]}
    merged = report_lib.merge_earlier({**now, "command": "second"}, earlier, full, methods={"graddot"})
    assert [(r["cell"], r["method"], r["lds"]["mean"]) for r in merged["rows"]] == [
        ("a", "stride", 0.1), ("a", "graddot", 0.3), ("b", "stride", 0.1), ("b", "graddot", 0.1)]
    assert merged["variants"] == earlier["variants"] and merged["qualitative"] == earlier["qualitative"]
    assert merged["earlier_rows"] == [{"cell": "a", "methods": ["stride"], "command": "first", "machine": "m",
                                       "date": "d", "derived": ["qualitative"]}]
    assert ("In cell a, the rows of stride are kept from an earlier run: `first`. Machine: m; d. So are its "
            "qualitative entries.") in report_lib.markdown(merged, "second")
    merged["command"] = "second"
    again = report_lib.merge_earlier(_fake_report([("a", 1000, 100)]) | {"rows": []}, merged, full,
                                     methods={"stride"})
    assert [(r["cell"], r["method"]) for r in again["rows"]] == [("a", "graddot"), ("b", "stride"), ("b", "graddot")]
    assert again["earlier_rows"][0]["methods"] == ["graddot"] and again["earlier_rows"][0]["command"] == "second"
    assert again["variants"] == []  # the stride run's own (here none) replace the earlier variants
    assert "earlier_rows" not in report_lib.merge_earlier(_fake_report([("a", 1000, 100)]), merged, full)
    fresh = {**_fake_report([("a", 1000, 100)]), "qualitative": [{"cell": "a", "query": "new"}]}
    redone = report_lib.merge_earlier(fresh, merged, full, methods={"stride", "graddot"})  # all of a ran
    assert redone["qualitative"] == fresh["qualitative"] and "earlier_rows" not in redone
    from stride_jax.harness import experiment

    cfg = load_config(CONFIGS / "nk_regime.yaml")
    with pytest.raises(ValueError, match=r"unknown method row\(s\) \['tracin2'\]"):
        experiment.check_methods(cfg, ["graddot", "tracin2"])
    assert cli.main(["run", str(CONFIGS / "nk_regime.yaml"), "--methods", "nope", "--no-progress"]) == 2
    assert "unknown method row(s) ['nope']" in capsys.readouterr().err


def test_a_methods_run_of_one_select_group_keeps_the_other_groups_rows():
    """`--methods stride-K=n` runs STRIDE's select group "K=n" only: its chosen row, variants and
    selection replace the earlier ones; group ""'s ("stride") and the other groups' stay, with
    where they come from; "stride" still names every group, and an unknown group is refused."""
    full = {"name": "x", "cells": [{"name": "a"}], "task": {"kind": "lm"}, "methods": [{"name": "graddot"}]}
    var = [{"cell": "a", "group": g, "variant": "v", "override": {}, "seconds": {}, "lds_val": {"mean": 0.2}}
           for g in ("", "K=n", "K=2n")]
    earlier = {**_fake_report([("a", 1000, 100)]), "config": full, "command": "first", "variants": var,
               "selection": [{"cell": "a", "group": g, "chosen": "v", "val_lds": 0.2} for g in ("", "K=n", "K=2n")]}
    earlier["rows"] += [{**earlier["rows"][0], "method": m} for m in ("stride-K=n", "stride-K=2n")]
    now = {**_fake_report([("a", 1000, 100)]), "command": "second",
           "variants": [{**var[1], "lds_val": {"mean": 0.5}}], "selection": [{"cell": "a", "group": "K=n"}]}
    now["rows"] = [{**now["rows"][0], "method": "stride-K=n", "lds": {"mean": 0.5, "ci95": [0.4, 0.6]}}]
    merged = report_lib.merge_earlier(now, earlier, full, methods={"stride-K=n"})
    assert sorted((r["method"], r["lds"]["mean"]) for r in merged["rows"]) == [
        ("graddot", 0.1), ("stride", 0.1), ("stride-K=2n", 0.1), ("stride-K=n", 0.5)]
    assert sorted((v["group"], v["lds_val"]["mean"]) for v in merged["variants"]) == [("", 0.2), ("K=2n", 0.2),
                                                                                     ("K=n", 0.5)]
    assert sorted(s["group"] for s in merged["selection"]) == ["", "K=2n", "K=n"]
    assert sorted(merged["earlier_rows"][0]["methods"]) == ["graddot", "stride", "stride-K=2n"]
    every = report_lib.merge_earlier(now, earlier, full, methods={"stride"})
    assert sorted(r["method"] for r in every["rows"]) == ["graddot", "stride-K=n"]
    from stride_jax.harness import experiment

    cfg = load_config(CONFIGS / "sft_lds.yaml")
    assert experiment.check_methods(cfg, ["stride-K=n", "stride-K=2n"]) == ["stride-K=n", "stride-K=2n"]
    with pytest.raises(ValueError, match=r"unknown method row\(s\) \['stride-K=3n'\]"):
        experiment.check_methods(cfg, ["stride-K=3n"])


def test_qualitative_columns_follow_the_config_and_say_where_kept_entries_come_from():
    """The side-by-side columns are in the config's method order, also for entries reread from a
    json (whose keys are sorted), and the file names the run its kept entries come from."""
    ex = {"helpful": [{"index": 0, "score": 1.0, "text": "h"}], "harmful": [{"index": 1, "score": -1.0, "text": "x"}]}
    report = {"config": {"name": "x", "qualitative": {"name": "qual", "methods": ["stride", "logra"], "k": 1,
                                                      "max_chars": 50}},
              "machine": "m", "date": "d", "rows": [],
              "earlier_rows": [{"cell": "a", "methods": ["logra"], "command": "first", "machine": "m0", "date": "d0",
                                "derived": ["qualitative"]}],
              "qualitative": [{"cell": "a", "query_index": 3, "query": "q", "methods": {"logra": ex, "stride": ex}}]}
    md = report_lib.qualitative_markdown(report, "second")
    assert "| | stride | logra |" in md
    assert "In cell a, the rows of logra are kept from an earlier run: `first`" in md


def test_a_methods_run_computes_only_its_rows_end_to_end(tmp_path, monkeypatch):
    """`run(..., methods=["random"])` after a full run: only random's method runs again (the
    ground truth resumes from the store), bm25's row is the earlier one, and the file says so."""
    from stride_jax.harness import experiment

    cfg = ExperimentConfig.from_dict({**TINY, "variants": {}, "methods": ["bm25", "random"]})
    experiment.run(cfg, tmp_path / "out", tmp_path, progress=False, command="first")
    first = json.loads((tmp_path / "tiny.json").read_text())
    ran = []
    real = experiment.runner.run_method
    monkeypatch.setattr(experiment.runner, "run_method", lambda task, d, spec, *a, **k: ran.append(spec.name) or
                        real(task, d, spec, *a, **k))
    experiment.run(cfg, tmp_path / "out", tmp_path, progress=False, command="second", methods=["random"])
    second = json.loads((tmp_path / "tiny.json").read_text())
    assert ran == ["random"]
    assert [r["method"] for r in second["rows"]] == [r["method"] for r in first["rows"]] == ["bm25", "random"]
    assert second["rows"][0] == first["rows"][0] and second["rows"][1]["lds"] == first["rows"][1]["lds"]
    assert second["earlier_rows"][0]["methods"] == ["bm25"] and second["earlier_rows"][0]["command"] == "first"


def test_a_conflicting_results_file_stops_a_cells_run_before_any_work(tmp_path, monkeypatch):
    """`--cells` with a results file written by another version of the config: the ValueError
    comes before the ground truth is prepared (it used to come after hours of work)."""
    from stride_jax.harness import experiment

    args = cli.build_parser().parse_args(["run", str(CONFIGS / "nk_regime.yaml"), "--cells", "0.2M-n768"])
    cfg, whole = cli._experiment(args, whole=True)
    earlier = {"config": {**whole.to_dict(), "n_boot": -1}, "cells": [], "rows": []}
    (tmp_path / f"{cfg.name}.json").write_text(json.dumps(earlier))
    monkeypatch.setattr(experiment.tasks_lib, "prepare", lambda *a, **k: pytest.fail("prepared before the check"))
    with pytest.raises(ValueError, match="another version"):
        experiment.run(cfg, tmp_path / "out", tmp_path, progress=False, full=whole)


def test_a_cell_can_leave_a_select_group_out(tmp_path):
    """cells[].groups[g] = null: that cell runs no variant of group g (no `stride-g` row), the
    other cells do; the group's own settings reach the cells that keep it."""
    cfg = json.loads(json.dumps(TINY))
    cfg.update(methods=["random"], variants={"base": {}},
               select={"n_boot": 20, "groups": {"": {}, "small": {"design": {"n_subsets": 12}}}},
               cells=[{"name": "a"}, {"name": "b", "groups": {"small": None}}])
    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert sorted((r["cell"], r["method"]) for r in report["rows"] if r["method"] != "random") == [
        ("a", "stride"), ("a", "stride-small"), ("b", "stride")]
    small = [v for v in report["variants"] if v["group"] == "small"]
    assert [v["cell"] for v in small] == ["a"]
