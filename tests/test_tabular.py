"""The shipped tabular data sets: exact copies of scikit-learn's, seeded stratified splits."""

import numpy as np
import pytest

from stride_jax import tabular


@pytest.mark.parametrize("name, shape, n_classes", [
    ("digits", (1797, 64), 10), ("breast_cancer", (569, 30), 2), ("wine", (178, 13), 3),
])
def test_shipped_arrays_match_sklearn(name, shape, n_classes):
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
             "wine": datasets.load_wine}[name]()
    x, y = tabular.load_raw(name)
    assert x.shape == shape and y.shape == (shape[0],)
    np.testing.assert_array_equal(x.astype(np.float64), bunch.data)
    np.testing.assert_array_equal(y, bunch.target)
    assert len(np.unique(y)) == n_classes


@pytest.mark.parametrize("name", tabular.DATASETS)
def test_splits_are_disjoint_stratified_and_standardised(name):
    s = tabular.load_splits(name)
    x_raw, y_raw = tabular.load_raw(name)
    ids = [s.train.ids, s.val.ids, s.test.ids]
    all_ids = np.concatenate(ids)
    assert len(np.unique(all_ids)) == len(all_ids) == len(y_raw)  # a partition of the rows
    for ex in (s.train, s.val, s.test):
        assert ex.inputs.dtype == np.float32 and ex.targets.dtype == np.int32 and ex.texts is None
        assert ex.inputs.shape == (len(ex), s.n_features)
        np.testing.assert_array_equal(ex.targets, y_raw[ex.ids])  # ids are rows of the data set
        np.testing.assert_allclose(ex.inputs, (x_raw[ex.ids] - s.mean) / s.std, rtol=1e-5, atol=1e-5)
    # standardised with train statistics only
    assert abs(s.train.inputs.mean()) < 1e-4
    if tabular.DEFAULT_SCALING[name] == "feature":
        np.testing.assert_allclose(s.train.inputs.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(s.train.inputs.std(axis=0), 1, atol=1e-3)
    else:
        assert np.allclose(s.std, s.std[0]) and abs(s.train.inputs.std() - 1) < 1e-3
    # every class appears in val and test, in about the train proportions
    for ex in (s.val, s.test):
        assert set(np.unique(ex.targets)) == set(range(s.n_classes))
        frac = np.bincount(ex.targets, minlength=s.n_classes) / len(ex)
        ref = np.bincount(s.train.targets, minlength=s.n_classes) / len(s.train)
        np.testing.assert_allclose(frac, ref, atol=0.05)


def test_split_is_seeded():
    a, b = tabular.load_splits("wine"), tabular.load_splits("wine")
    np.testing.assert_array_equal(a.test.ids, b.test.ids)
    np.testing.assert_array_equal(a.train.inputs, b.train.inputs)
    c = tabular.load_splits("wine", tabular.SplitConfig(seed=1))
    assert not np.array_equal(a.test.ids, c.test.ids)
    assert a.train.content_hash() != c.train.content_hash()


def test_fractions_and_validation():
    s = tabular.load_splits("digits", tabular.SplitConfig(val_fraction=0.1, test_fraction=0.2))
    assert abs(len(s.val) - 180) <= 10 and abs(len(s.test) - 359) <= 10
    with pytest.raises(ValueError, match="unknown tabular data set"):
        tabular.load_splits("iris")
    with pytest.raises(ValueError, match="sum < 1"):
        tabular.SplitConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="scaling"):
        tabular.SplitConfig(scaling="minmax")
    s = tabular.load_splits("wine", tabular.SplitConfig(scaling="global"))
    assert np.allclose(s.std, s.std[0])


def test_no_sklearn_import_at_runtime():
    import subprocess
    import sys

    code = ("import sys; import stride_jax.tabular as t; t.load_splits('digits'); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
