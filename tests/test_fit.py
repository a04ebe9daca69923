"""Operator fitting: losses move the right way, resume == uninterrupted, no recompilation."""

import jax
import numpy as np
import pytest

from stride_jax import measure as measure_lib
from stride_jax import models
from stride_jax.config import StrideConfig
from stride_jax.design import left_regular_design
from stride_jax.fit import Fitter, ridge_residual

CFG = models.GPTConfig(vocab_size=48, seq_len=10, n_layers=2, d_model=32, n_heads=2)
N = 40


@pytest.fixture(scope="module")
def model():
    return models.build(CFG, seed=0)


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (N, CFG.seq_len + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def small_cfg(**fit):
    base = {"steps": 8, "subsets_per_step": 4, "fidelity_batch": 3, "stability_batch": 3, "probe_batch": 4,
            "positions_per_example": 4, "checkpoint_every": 4, "linearity_weight": 0.5, "sketch_dim": 2}
    base.update(fit)
    return StrideConfig().replace(design={"n_subsets": 8, "per_example": 2}, steering={"layer": 1, "rank": 4},
                                  fit=base)


def leaves(bank):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves((bank.basis, bank.coef))]


def test_fit_lowers_fidelity_loss(model, pool):
    cfg = small_cfg(steps=60, learning_rate=0.05, linearity_weight=0.0, stability_weight=0.1)
    design = left_regular_design(N, 8, 2, 0)
    fitter = Fitter(model, *pool, design, cfg)
    first = fitter.run(max_steps=1, progress=False)
    assert fitter.step == 1
    m0 = measure_lib.measure(model, first, pool[0], pool[1], cfg.steering, progress=False)
    bank = fitter.run(progress=False)
    m1 = measure_lib.measure(model, bank, pool[0], pool[1], cfg.steering, progress=False)
    members = design.dense().astype(bool)  # [K, N]
    own = lambda m: np.mean([m.steered_loss_QxK[members[k], k].mean() for k in range(8)])
    assert own(m1) < own(m0) - 0.05  # operators learned their subsets


def test_resume_equals_uninterrupted(model, pool, tmp_path):
    cfg = small_cfg()
    design = left_regular_design(N, 8, 2, 0)
    straight = Fitter(model, *pool, design, cfg).run(progress=False)

    part = Fitter(model, *pool, design, cfg, workdir=tmp_path / "fit")
    part.run(max_steps=5, progress=False)  # "killed" after step 5; last checkpoint at step 5
    del part
    resumed_fitter = Fitter(model, *pool, design, cfg, workdir=tmp_path / "fit")
    assert resumed_fitter.step == 5
    resumed = resumed_fitter.run(progress=False)
    for a, b in zip(leaves(straight), leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "fit" / "metrics.jsonl").exists()
    assert (tmp_path / "fit" / "config.json").exists()


def test_workdir_from_other_config_is_rejected(model, pool, tmp_path):
    design = left_regular_design(N, 8, 2, 0)
    Fitter(model, *pool, design, small_cfg(), workdir=tmp_path / "fit").run(max_steps=4, progress=False)
    with pytest.raises(ValueError, match="different run"):
        Fitter(model, *pool, design, small_cfg(learning_rate=0.5), workdir=tmp_path / "fit")


def test_corrupted_metadata_is_reported(model, pool, tmp_path):
    design = left_regular_design(N, 8, 2, 0)
    Fitter(model, *pool, design, small_cfg(), workdir=tmp_path / "fit").run(max_steps=4, progress=False)
    (tmp_path / "fit" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        Fitter(model, *pool, design, small_cfg(), workdir=tmp_path / "fit")


def test_second_run_does_not_recompile(model, pool):
    fitter = Fitter(model, *pool, left_regular_design(N, 8, 2, 0), small_cfg())
    fitter.run(max_steps=2, progress=False)
    compiled = fitter._step._cache_size()
    fitter.run(max_steps=3, progress=False)
    assert fitter._step._cache_size() == compiled


def test_design_and_pool_mismatch(model, pool):
    with pytest.raises(ValueError, match="design covers"):
        Fitter(model, *pool, left_regular_design(N + 1, 8, 2, 0), small_cfg())


def test_ridge_residual_zero_for_linear_responses():
    rng = np.random.default_rng(0)
    sketch = rng.standard_normal((16, 3))
    y = sketch @ rng.standard_normal((3, 5))
    assert float(ridge_residual(sketch, y, 1e-8)) < 1e-10
    assert float(ridge_residual(sketch, rng.standard_normal((16, 5)), 1e-8)) > 0.1


def test_bad_fit_configs():
    with pytest.raises(ValueError, match="steps"):
        small_cfg(steps=0)
    with pytest.raises(ValueError, match="stability_weight"):
        small_cfg(stability_weight=-1.0)
    with pytest.raises(ValueError, match="per_example"):
        StrideConfig().replace(design={"n_subsets": 4, "per_example": 5})
    with pytest.raises(ValueError, match="K"):
        StrideConfig().replace(design={"n_subsets": 0})
