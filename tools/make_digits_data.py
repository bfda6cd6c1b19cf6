"""Write src/bpfast/data/digits.npz, the copy of the 8x8 digits that `bpfast demo` uses.

The data are scikit-learn's `load_digits()` (its file sklearn/datasets/data/digits.csv.gz;
scikit-learn is BSD-3-Clause licensed), which is the test part of the UCI "Optical
Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0):
1797 images of 8x8 pixels with values 0..16, and their labels 0..9. Stored as uint8
in a compressed .npz (keys X and y), read back with allow_pickle=False.

Usage: python tools/make_digits_data.py   (needs scikit-learn)
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

TARGET = Path(__file__).resolve().parent.parent / "src" / "bpfast" / "data" / "digits.npz"


def main():
    digits = load_digits()
    images = digits.data.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    # the uint8 copy must be exact: values are whole numbers in [0, 16]
    assert np.array_equal(images, digits.data) and np.array_equal(labels, digits.target)
    np.savez_compressed(TARGET, X=images, y=labels)
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes, {images.shape[0]} images)")


if __name__ == "__main__":
    main()
