"""Image-classification data: rows with an image (a file, or its bytes) and a label, checked by decoding every image
once; the preprocessing a checkpoint expects (size, mean/std) and the training augmentation, written with PIL and
torch (torchvision is not needed).

Rows come from a folder of class folders of image files, or from a `.csv`/`.jsonl`/`.json`/`.parquet` file with an
image column (a path, relative to the data file's folder, or the image's bytes) and a label column. A corrupt or
unreadable image stops with its file and row, before any model loads (or is skipped and counted).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.data.classification import ClassificationData, LabelMap, _label, split_labelled
from finetune.data.rows import Rows
from finetune.errors import DataError
from finetune.recipe import DataSource, Recipe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PREPROCESSING_FILE = "preprocessing.json"

# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def open_image(value, origin: str):
    """An RGB PIL image from a path or bytes; anything unreadable raises ValueError naming what was wrong.

    Grayscale, palette and alpha images become 3-channel RGB (16-bit grayscale is scaled to 8 bits first)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            image = Image.open(value)
        image.load()  # decode now: a truncated or corrupt file fails here, not in a training step
    except FileNotFoundError:
        raise ValueError(f"image file not found: {value}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        what = "the image bytes" if isinstance(value, (bytes, bytearray)) else str(value)
        raise ValueError(f"{what} cannot be read as an image ({exc})") from None
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        import numpy as np

        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels.clip(0, top) * (255.0 / top)).round().astype("uint8"), mode="L")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def read_image_folder(folder: Path) -> list[dict]:
    """Rows {image, label, file} from a folder of class sub-folders of image files; the label is the sub-folder's name.
    Sorted, so the rows (and a seeded split of them) are the same on every machine."""
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                rows.append({"image": str(file), "label": class_dir.name, "file": str(file)})
    if not rows:
        raise DataError(
            f"{folder}: no image files in class sub-folders; expected {folder}/<label>/<name>.png "
            f"(or {', '.join(IMAGE_SUFFIXES[1:])})"
        )
    return rows


def _image_value(value, column: str, base: Path):
    """A row's image as a path or bytes: a path relative to the data file's folder, bytes, or a `datasets` Image
    dict {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)
    raise ValueError(f"'{column}' must be an image file path or the image's bytes, got {type(value).__name__}")


def load_image_rows(sources: list[DataSource], recipe: Recipe, base_dir: Path | None = None, decode: bool = True) -> Rows:
    """Read every row and decode every image once; a bad row raises with its file and row (or is skipped and
    counted, per `data.on_bad_row`). Rows are {image, labels, origin}. `decode=False` (the data report, which
    training's own reading precedes or follows) checks the image's path or bytes only: images are decoded once."""
    import datasets

    from finetune.data.rows import is_local, local_path, read_source

    c, on_bad_row = recipe.image, recipe.data.on_bad_row
    out = Rows(rows=[])
    for source in sources:
        folder = local_path(source, base_dir) if is_local(source) else None
        by_file = folder is not None and folder.is_dir()  # a folder source: the file names the row
        if by_file:
            rows = read_image_folder(folder)
            image_column, label_column, base = "image", "label", folder
        else:
            ds = read_source(source, base_dir)
            missing = [name for name in (c.image_column, c.label_column) if name not in ds.column_names]
            if missing:
                raise DataError(
                    f"{source.path}: no column(s) {missing}; the data has {ds.column_names}. Set image.image_column/"
                    "label_column, or map yours with `columns:` in the data source."
                )
            if isinstance(ds.features.get(c.image_column), datasets.Image):
                ds = ds.cast_column(c.image_column, datasets.Image(decode=False))  # {bytes, path}: decoded below
            rows, image_column, label_column = ds, c.image_column, c.label_column
            base = folder.parent if folder is not None else Path.cwd()
        for index, row in enumerate(rows):
            origin = row["file"] if by_file else f"{source.path}, row {index + 1}"

            def build(row=row, origin=origin) -> dict:
                image = _image_value(row.get(image_column), image_column, base)
                if decode:
                    open_image(image, origin)
                elif isinstance(image, str) and not Path(image).is_file():
                    raise ValueError(f"image file not found: {image}")
                return {"image": image, "labels": (_label(row.get(label_column), label_column),), "origin": origin}

            out.add(origin, build, on_bad_row)
    return out.checked(sources)


def prepare_image_data(recipe: Recipe) -> ClassificationData:
    """Train/eval rows (seeded split when `data.eval_fraction`) and the label map of the training rows, as for text
    classification (`finetune.data.classification.split_labelled`)."""
    return split_labelled(recipe, lambda sources: load_image_rows(sources, recipe), multi_label=False)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: `size` x `size` pixels in [0, 1], normalized by `mean`/`std`.

    Training adds a random resized crop (area share in `crop_scale`, aspect 3/4..4/3) and a horizontal flip when
    `augment` is on; evaluation resizes the shorter side to `size` and takes the centre. Saved with the run as
    `preprocessing.json`, so `finetune predict` prepares images exactly as evaluation did."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    source: str = ""  # where size and mean/std came from, for the plan

    def describe(self) -> str:
        aug = "off"
        if self.augment:
            aug = f"random resized crop {self.crop_scale[0]:g}-{self.crop_scale[1]:g}" + (" + flip" if self.flip else "")
        mean = ", ".join(f"{v:.3f}" for v in self.mean)
        std = ", ".join(f"{v:.3f}" for v in self.std)
        return f"{self.size}x{self.size}, mean ({mean}), std ({std}) [{self.source}]; augmentation {aug}"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / PREPROCESSING_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> Preprocessing:
        data = json.loads((Path(folder) / PREPROCESSING_FILE).read_text())
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"]), "crop_scale": tuple(data["crop_scale"])})

    def hf_processor_config(self) -> dict:
        """A `preprocessor_config.json` that transformers' ViTImageProcessor reads: resize and normalize (the
        evaluation transform, for square images)."""
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": self.size, "width": self.size},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    def __call__(self, image, train: bool = False):
        """The model's input tensor (3 x size x size) for an RGB PIL image."""
        import numpy as np
        import torch
        from PIL import Image

        if train and self.augment:
            image = self._random_resized_crop(image)
            if self.flip and torch.rand(()) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = self._resize_center(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    def _resize_center(self, image):
        from PIL import Image

        w, h = image.size
        scale = self.size / min(w, h)
        rw, rh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = (rw - self.size) // 2, (rh - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def _random_resized_crop(self, image):
        """torchvision's RandomResizedCrop: an area share in `crop_scale` and a log-uniform aspect ratio in 3/4..4/3,
        ten tries, then the centre; drawn from torch's RNG (seeded by the Trainer)."""
        import torch
        from PIL import Image

        w, h = image.size
        area = w * h
        for _ in range(10):
            share = float(torch.empty(()).uniform_(*self.crop_scale))
            ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3))))
            cw, ch = round(math.sqrt(area * share * ratio)), round(math.sqrt(area * share / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left = int(torch.randint(0, w - cw + 1, ()))
                top = int(torch.randint(0, h - ch + 1, ()))
                return image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
        return self._resize_center(image)


def recipe_preprocessing(recipe: Recipe, size: int, mean, std, source: str) -> Preprocessing:
    """The checkpoint's size and mean/std (given), each replaced by the recipe's `image.*` where it sets one."""
    c = recipe.image
    given = [name for name in ("size", "mean", "std") if getattr(c, name) is not None]
    if given:
        source = f"{', '.join('image.' + n for n in given)} from the recipe; the rest {source}" if len(given) < 3 else "the recipe"
    return Preprocessing(
        size=c.size or size,
        mean=tuple(c.mean or mean),
        std=tuple(c.std or std),
        augment=c.augment,
        crop_scale=tuple(c.crop_scale),
        flip=c.flip,
        source=source,
    )


class ImageDataset:
    """A map-style dataset for the Trainer: {pixel_values, labels} per row, images decoded when read (a file that
    changed since the check still names its row)."""

    def __init__(self, rows: list[dict], labels: LabelMap, preprocessing: Preprocessing, train: bool):
        self.rows = rows
        self.labels = labels
        self.preprocessing = preprocessing
        self.train = train

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        try:
            image = open_image(row["image"], row["origin"])
        except ValueError as exc:
            raise DataError(f"{row['origin']}: {exc}") from None
        return {"pixel_values": self.preprocessing(image, train=self.train), "labels": self.labels.encode(row["labels"])}


class FeatureDataset:
    """{features, labels} rows of features computed once by a frozen backbone (head-only training)."""

    def __init__(self, features, labels):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.features[index], "labels": self.labels[index]}


# --------------------------------------------------------------------------------------------
# The data report (`finetune data`)
# --------------------------------------------------------------------------------------------


def report_facts(recipe: Recipe):
    """The rows as `prepare_image_data` reads them, for the data report: labels per split, and exact duplicates by
    the image file's bytes. Images are not decoded here (training and `finetune validate --data` decode each once)."""
    import hashlib

    from finetune.data.classification import report_rows
    from finetune.data.report import DataFacts, RowFacts

    rows, tally, notes = report_rows(recipe, lambda sources: load_image_rows(sources, recipe, decode=False), False)

    def facts():
        for row, split in rows:
            image = row["image"]
            content = image if isinstance(image, bytes) else Path(image).read_bytes()
            key = int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little") or 1
            yield RowFacts(split=split, origin=row["origin"], key=key, labels=tuple(str(v) for v in row["labels"]))

    return DataFacts(rows=facts(), batching="images", max_length=None, micro_batch_size=recipe.train.micro_batch_size,
                     tally=tally, trains_on="labels", notes=notes)
