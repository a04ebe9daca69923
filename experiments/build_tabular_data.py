"""Export scikit-learn's bundled digits, breast-cancer and wine arrays into `stride_jax/assets/`.

    /work/venv/bin/python experiments/build_tabular_data.py    # needs scikit-learn (test extra)

Writes `<name>.npz` (X, y, feature_names, target_names; no pickle) for each data set and
(re)writes the "Tabular data" section of `assets/SOURCES.md` with provenance, licences and
sha256 checksums. The arrays are copied exactly as scikit-learn ships them (digits as uint8,
pixel counts 0..16; the other two as float64), so `stride_jax.tabular` needs no scikit-learn
at runtime. Rerunning it with the same scikit-learn gives byte-identical arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parents[1] / "stride_jax" / "assets"
BEGIN, END = "<!-- tabular-data:begin -->", "<!-- tabular-data:end -->"

PROVENANCE = {
    "digits": (
        "UCI Optical Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998), CC BY 4.0: "
        "the 1797-image test set, 8x8 blocks of pixel counts 0..16, 10 classes. Stored as uint8."
    ),
    "breast_cancer": (
        "UCI Breast Cancer Wisconsin (Diagnostic) (W. H. Wolberg, W. N. Street, O. L. Mangasarian, "
        "1995), CC BY 4.0: 569 cases x 30 real features, 2 classes (0 = malignant, 1 = benign)."
    ),
    "wine": (
        "UCI Wine recognition (M. Forina et al.; donor S. Aeberhard, 1991), CC BY 4.0: 178 wines x "
        "13 chemical measurements, 3 cultivars."
    ),
}


def _arrays(name: str) -> dict[str, np.ndarray]:
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
              "wine": datasets.load_wine}[name]
    bunch = loader()
    x = np.asarray(bunch.data)
    if name == "digits":
        if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 16:
            raise ValueError("digits pixels are expected to be integers in 0..16")
        x = x.astype(np.uint8)
    return {
        "X": x,
        "y": np.asarray(bunch.target).astype(np.uint8),
        "feature_names": np.asarray([str(f) for f in bunch.feature_names]),
        "target_names": np.asarray([str(t) for t in bunch.target_names]),
    }


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed npz with fixed member timestamps, so reruns are byte-identical."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def _section(rows: list[tuple[str, dict[str, np.ndarray], str, int]]) -> str:
    import sklearn

    lines = [
        BEGIN,
        "## Tabular data: digits.npz, breast_cancer.npz, wine.npz",
        "",
        f"Exported from scikit-learn {sklearn.__version__} (BSD-3-Clause), which bundles these UCI "
        "data sets, by `experiments/build_tabular_data.py` (rerun it rather than editing; it rewrites "
        "only this section). Each npz holds `X`, `y`, `feature_names`, `target_names`, loaded "
        "with `allow_pickle=False` by `stride_jax.tabular`. Dua, D. and Graff, C. (2019), UCI "
        "Machine Learning Repository, University of California, Irvine.",
        "",
        "| file | rows x features | classes | source and licence | bytes | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for name, arrays, sha, size in rows:
        n, f = arrays["X"].shape
        lines.append(f"| {name}.npz | {n} x {f} ({arrays['X'].dtype}) | {len(arrays['target_names'])} | "
                     f"{PROVENANCE[name]} | {size:,} | {sha} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_sources(section: str, sources: Path) -> None:
    """Replace the tabular section of SOURCES.md (or append it)."""
    text = sources.read_text(encoding="utf-8") if sources.exists() else "# Shipped data: sources and licences\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    sources.write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in PROVENANCE:
        arrays = _arrays(name)
        path = args.out / f"{name}.npz"
        _write_npz(path, arrays)
        blob = path.read_bytes()
        rows.append((name, arrays, hashlib.sha256(blob).hexdigest(), len(blob)))
        print(f"{path}: X {arrays['X'].shape} {arrays['X'].dtype}, {len(blob):,} bytes")
    write_sources(_section(rows), args.out / "SOURCES.md")


if __name__ == "__main__":
    main()
