"""Image classification (task: image_classification): tiny random ResNet, ViT and a plain torch model learn a
separable toy image set with LoRA, head-only and full training; what each mode must leave frozen stays bit-exact;
a plain state dict loads partially; merge, predict, and the errors a user meets before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import image_recipe

from finetune.data.classification import LabelMap
from finetune.errors import DataError, FinetuneError, RecipeError
from finetune.recipe import validate_recipe

LABELS = LabelMap(("blue", "green", "red"))


def train(recipe: dict):
    from finetune.runner import run

    return run(validate_recipe(recipe))


def fresh_base(recipe: dict):
    """The base the run started from: built again from the recipe (new weights are drawn from train.seed)."""
    from finetune.models.vision import build_image_model

    return build_image_model(validate_recipe(recipe), LABELS, dtype=torch.float32).model


def backbone_state(model, heads: tuple[str, ...]) -> dict:
    """Every parameter and buffer (BatchNorm running statistics and counters too) outside the head, by the key
    the bare model has: PEFT's `base_layer.` is dropped and its LoRA weights left out."""
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key or "modules_to_save" in key or "original_module" in key:
            continue
        key = key.replace(".base_layer", "").removeprefix("base_model.model.")
        if not any(key == h or key.startswith(h + ".") for h in heads):
            state[key] = value.detach().clone()
    return state


def assert_backbone_unchanged(trained, base, heads: tuple[str, ...]) -> int:
    before, after = backbone_state(base, heads), backbone_state(trained, heads)
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    return len(before)


# --------------------------------------------------------------------------------------------
# Learning, and what each mode leaves frozen
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_lora_run(tiny_resnet_dir, toy_images_dir, tmp_path_factory):
    recipe = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path_factory.mktemp("resnet-lora"))
    return recipe, train(recipe)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("mode", ["lora", "head", "head-cached"])
def test_tiny_models_learn_toy_images_and_keep_the_backbone_frozen(arch, mode, tiny_resnet_dir, tiny_vit_dir, toy_images_dir, tmp_path, request):
    """`head`: every step runs the whole model (the frozen BatchNorm layers see training mode and must ignore it);
    `head-cached`: the backbone runs once and the head trains on its features."""
    model_dir = tiny_resnet_dir if arch == "resnet" else tiny_vit_dir
    if arch == "resnet" and mode == "lora":
        recipe, result = request.getfixturevalue("resnet_lora_run")
    else:
        rate = {"learning_rate": 3e-2} if mode != "lora" else {}  # a head alone on random features takes a larger step
        image = {"cache_features": mode == "head-cached"}
        recipe = image_recipe(model_dir, toy_images_dir, tmp_path / "out", adapter={"type": mode.split("-")[0]}, train=rate, image=image)
        result = train(recipe)
    model = result.model.model if type(result.model).__name__ == "CachedFeatureClassifier" else result.model
    assert (model is not result.model) == (mode == "head-cached")
    report = json.loads((result.output_dir / "eval_metrics.json").read_text())
    assert report["num_examples"] == 9
    assert report["accuracy"] >= 8 / 9, report  # untrained: a third; the colours are separable
    assert (result.output_dir / "confusion_matrix.png").is_file()
    assert LabelMap.load(result.output_dir).names == LABELS.names
    compared = assert_backbone_unchanged(model, fresh_base(recipe), ("classifier",))
    assert compared > (20 if arch == "resnet" else 30)  # every conv/attention weight, and BatchNorm statistics
    if mode == "lora":
        lora = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora and all(p.abs().sum() > 0 for p in lora)  # LoRA B starts at zero: it moved
    else:
        assert not (result.output_dir / "adapter_config.json").exists()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("classifier.") for n in trainable)


def test_cached_features_give_the_whole_model_logits(tiny_resnet_dir, toy_images_dir, tmp_path):
    """The head trained on cached features, saved inside the whole model: the run folder's model on the held-out
    images gives the logits the trainer computed from the cached features."""
    from finetune.data.images import prepare_image_data
    from finetune.evaluation.image_classifier import load_image_classifier, predict_image_logits

    recipe = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "out", adapter="head", train={"epochs": 2})
    result = train(recipe)
    assert type(result.trainer.eval_dataset).__name__ == "FeatureDataset"
    from_features = torch.as_tensor(result.trainer.predict(result.trainer.eval_dataset).predictions)
    rows = prepare_image_data(validate_recipe(recipe)).eval_rows
    whole = predict_image_logits(load_image_classifier(result.output_dir), [Path(r["image"]) for r in rows])
    assert torch.allclose(whole, from_features, atol=1e-5)


def test_batchnorm_statistics_move_in_a_full_fine_tune(tiny_resnet_dir, toy_images_dir, tmp_path):
    """The control for the frozen-statistics check above: the same run with every weight trained does change them."""
    recipe = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "full", adapter="none", train={"epochs": 1})
    result = train(recipe)
    before, after = backbone_state(fresh_base(recipe), ("classifier",)), backbone_state(result.model, ("classifier",))
    moved = [k for k in before if "running_mean" in k and not torch.equal(before[k], after[k])]
    assert len(moved) == sum("running_mean" in k for k in before) > 0


# --------------------------------------------------------------------------------------------
# Partial loading
# --------------------------------------------------------------------------------------------


def config_only(model_dir: Path, folder: Path) -> Path:
    """The model's config.json alone: the architecture, for a checkpoint given as a plain state dict."""
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    return folder


@pytest.mark.parametrize("kind", [".safetensors", ".pth"])
def test_a_state_dict_with_another_head_loads_every_other_weight_bit_exactly(kind, tiny_resnet_dir, toy_images_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from finetune.models.vision import build_image_model

    original = load_file(str(tiny_resnet_dir / "model.safetensors"))  # a 5-class head
    renamed = {f"module.{k}": v for k, v in original.items()}  # as a DataParallel checkpoint names them
    path = tmp_path / f"weights{kind}"
    save_file(renamed, str(path)) if kind == ".safetensors" else torch.save(renamed, path)
    recipe = image_recipe(config_only(tiny_resnet_dir, tmp_path / "arch"), toy_images_dir, tmp_path / "out",
                          image={"checkpoint": str(path), "key_map": {r"^module\.": ""}})  # fmt: skip
    built = build_image_model(validate_recipe(recipe), LABELS, dtype=torch.float32)
    state = built.model.state_dict()
    head = {"classifier.1.weight", "classifier.1.bias"}
    assert built.report.replaced == sorted(head)
    assert built.report.missing == [] and built.report.unexpected == []
    assert built.report.loaded == len(original) - 2 == built.report.total - 2
    for key, value in original.items():
        if key not in head:
            assert torch.equal(state[key], value), key
    assert state["classifier.1.weight"].shape == (3, 32)
    lines = dict(built.report.plan_lines())
    assert lines["checkpoint"] == f"36 of 38 tensors loaded from {path}"
    assert lines["  replaced"] == "2: classifier.1.bias, classifier.1.weight"


def test_preprocessing_follows_the_checkpoint_unless_the_recipe_sets_it(tiny_vit_dir, toy_images_dir, tmp_path):
    import shutil

    from finetune.data.images import recipe_preprocessing
    from finetune.models.vision import build_image_model, checkpoint_preprocessing

    folder = tmp_path / "vit"
    shutil.copytree(tiny_vit_dir, folder)
    recipe = validate_recipe(image_recipe(folder, toy_images_dir, tmp_path / "out", image={"size": None}))
    built = build_image_model(recipe, LABELS)
    assert checkpoint_preprocessing(built) == (32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                               "config image_size, ImageNet mean/std (no preprocessor_config.json)")  # fmt: skip
    processor = {"do_resize": True, "size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    assert checkpoint_preprocessing(built) == (32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "preprocessor_config.json")
    recipe = validate_recipe(image_recipe(folder, toy_images_dir, tmp_path / "out", image={"size": None, "mean": [0.1, 0.2, 0.3]}))
    chosen = recipe_preprocessing(recipe, *checkpoint_preprocessing(built))
    assert (chosen.size, chosen.mean, chosen.std) == (32, (0.1, 0.2, 0.3), (0.25, 0.25, 0.25))
    assert chosen.source == "image.mean from the recipe; the rest preprocessor_config.json"


def test_a_checkpoint_whose_keys_match_nothing_says_to_rename_them(tiny_resnet_dir, toy_images_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from finetune.models.vision import build_image_model

    path = tmp_path / "weights.safetensors"
    save_file({f"module.{k}": v for k, v in load_file(str(tiny_resnet_dir / "model.safetensors")).items()}, str(path))
    recipe = image_recipe(config_only(tiny_resnet_dir, tmp_path / "arch"), toy_images_dir, tmp_path / "out", image={"checkpoint": str(path)})
    with pytest.raises(FinetuneError, match=r"image.checkpoint: none of the 38 keys of .* is a key of the model .*image.key_map"):
        build_image_model(validate_recipe(recipe), LABELS)


# --------------------------------------------------------------------------------------------
# Errors before training
# --------------------------------------------------------------------------------------------


def test_label_count_against_the_checkpoint_head_without_ignore_mismatched_sizes(tiny_resnet_dir, toy_images_dir, tmp_path):
    recipe = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "out", image={"ignore_mismatched_sizes": False})
    with pytest.raises(FinetuneError) as err:
        train(recipe)
    assert str(err.value) == (
        f"image.ignore_mismatched_sizes is off, but {tiny_resnet_dir} does not fit this model with 3 labels: "
        "classifier.1.bias is (5) there and (3) here; classifier.1.weight is (5, 32) there and (3, 32) here. The "
        "checkpoint was trained for another number of classes (or another architecture). Set "
        "image.ignore_mismatched_sizes: true to replace those tensors with new ones (the head is then trained in full)."
    )
    assert not (tmp_path / "out" / "train_metrics.json").exists()


def test_an_image_size_the_model_cannot_take(tiny_vit_dir, toy_images_dir, tmp_path):
    recipe = image_recipe(tiny_vit_dir, toy_images_dir, tmp_path / "out", image={"size": 48})
    with pytest.raises(FinetuneError) as err:
        train(recipe)
    message = str(err.value)
    assert message.startswith(f"image.size: {tiny_vit_dir} cannot take 48x48 images: Input image size (48*48) doesn't match model (32*32)")
    assert message.endswith("This model takes 32x32 images (its config's image_size).")


def test_a_lora_target_that_matches_nothing(tiny_resnet_dir, toy_images_dir, tmp_path):
    recipe = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "out", adapter={"target_modules": ["query", "convolution"]})
    with pytest.raises(RecipeError) as err:  # before any weights load: the model is built on the meta device
        train(recipe)
    assert err.value.problems == [
        "adapter.target_modules: query match(es) no linear or 2-D convolution layer of the backbone (the head is "
        "trained in full anyway). Its layers are named: convolution; or use all-linear."
    ]


def test_depthwise_convolution_rank_must_be_divisible_by_its_groups(toy_images_dir, tmp_path):
    recipe = image_recipe("support:tiny_convnet", toy_images_dir, tmp_path / "out", adapter={"target_modules": ["3"], "r": 4})
    with pytest.raises(RecipeError) as err:  # a package's builder, called on the meta device by the recipe check
        train(recipe)
    assert err.value.problems == [
        "adapter.r: 4 does not fit model.3, a grouped (depthwise) convolution with groups=8: PEFT's LoRA on a grouped "
        "convolution needs a rank divisible by its groups. Use a multiple of 8, or leave depthwise layers out of "
        "adapter.target_modules."
    ]


def test_recipe_combinations(tiny_resnet_dir, toy_images_dir, tmp_path):

    with pytest.raises(RecipeError, match="adapter.type: head .* is for task: image_classification"):
        validate_recipe({"model": {"name_or_path": "x"}, "adapter": "head", "data": {"train": "d.jsonl"}, "output": {"dir": "o"}})
    with pytest.raises(RecipeError, match="image_classification does not quantize the model"):
        validate_recipe(image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path, quantization={"bits": 4}))


def test_the_shipped_image_recipe_validates_with_its_data(capsys):
    """recipes/image_transfer.yaml: its architecture, checkpoint and digits are installed (scripts/setup.sh), and
    every one of the 5,000 images decodes."""
    from support import REPO

    from finetune.commands.validate import validate_command
    from finetune.recipe import load_recipe

    path = REPO / "recipes" / "image_transfer.yaml"
    assert validate_command(load_recipe(path), str(path), check_rows=True) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "  data.train: 5000 usable rows"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_a_corrupt_image_names_its_file_and_row(toy_images_dir, tmp_path):
    from finetune.data.images import load_image_rows

    good = toy_images_dir / "red" / "000.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])  # a PNG cut short
    table = tmp_path / "images.csv"
    table.write_text(f"image,label\n{good},red\nbroken.png,blue\n")
    recipe = validate_recipe(image_recipe("x", table, tmp_path / "out"))
    with pytest.raises(DataError) as err:
        load_image_rows(recipe.data.train, recipe)
    assert str(err.value).startswith(f"{table}, row 2: {broken} cannot be read as an image (")
    assert str(err.value).endswith("(set data.on_bad_row: skip to drop such rows and count them)")

    folder = tmp_path / "folder"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        (folder / label / "ok.png").write_bytes(good.read_bytes())
    (folder / "b" / "bad.png").write_bytes(b"not an image at all")
    recipe = validate_recipe(image_recipe("x", folder, tmp_path / "out"))
    with pytest.raises(DataError, match=f"^{folder / 'b' / 'bad.png'}: {folder / 'b' / 'bad.png'} cannot be read as an image"):
        load_image_rows(recipe.data.train, recipe)
    recipe = validate_recipe(image_recipe("x", folder, tmp_path / "out", data={"on_bad_row": "skip"}))
    rows = load_image_rows(recipe.data.train, recipe)
    assert (len(rows.rows), rows.skipped) == (2, 1)


def test_image_bytes_in_parquet_and_grayscale_made_rgb(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from finetune.data.images import Preprocessing, load_image_rows, open_image

    buffer = io.BytesIO()
    Image.new("L", (28, 28), color=128).save(buffer, format="PNG")
    path = tmp_path / "digits.parquet"
    pq.write_table(pa.table({"image": [buffer.getvalue()] * 2, "label": [3, 7]}), path)
    recipe = validate_recipe(image_recipe("x", path, tmp_path / "out"))
    rows = load_image_rows(recipe.data.train, recipe).rows
    assert [r["labels"] for r in rows] == [(3,), (7,)] and rows[1]["origin"] == f"{path}, row 2"
    image = open_image(rows[0]["image"], "")
    assert image.mode == "RGB"
    pixels = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), augment=False)(image)
    assert pixels.shape == (3, 16, 16)
    assert torch.allclose(pixels, torch.full_like(pixels, (128 / 255 - 0.5) / 0.5), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Predict and merge
# --------------------------------------------------------------------------------------------


def test_predict_reproduces_the_run_evaluation(resnet_lora_run, capsys):
    from finetune.cli import main
    from finetune.evaluation.image_classifier import load_image_classifier, predict_image_logits

    recipe, result = resnet_lora_run
    rows = result.trainer.eval_dataset.rows
    classifier = load_image_classifier(result.output_dir)
    logits = predict_image_logits(classifier, [Path(r["image"]) for r in rows])
    expected = result.trainer.predict(result.trainer.eval_dataset).predictions
    assert torch.allclose(logits, torch.as_tensor(expected), atol=1e-5)
    assert main(["predict", str(result.output_dir), "--image", rows[0]["image"], "--top-k", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["predicted"] == [LABELS.names[int(logits[0].argmax())]]


def test_merge_of_an_image_lora_run_gives_the_adapter_logits(resnet_lora_run, toy_images_dir, tmp_path):
    from transformers import AutoModelForImageClassification

    from finetune.data.images import Preprocessing, open_image
    from finetune.evaluation.image_classifier import load_image_classifier
    from finetune.merge.merging import merge_adapter

    _, result = resnet_lora_run
    report = merge_adapter(result.output_dir, tmp_path / "merged")
    assert report.verification["passed"] and report.merged_modules == 6
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()  # plain transformers
    assert merged.config.id2label == {0: "blue", 1: "green", 2: "red"}
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    preprocessing = Preprocessing.load(tmp_path / "merged")
    pixels = torch.stack([preprocessing(open_image(str(p), "")) for p in sorted(toy_images_dir.rglob("*.png"))])
    adapter = load_image_classifier(result.output_dir).model
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=pixels).logits, adapter(pixel_values=pixels).logits, atol=1e-5)


def test_a_plain_torch_model_trains_merges_and_predicts(toy_images_dir, tmp_path):
    """`MODULE:CALLABLE` builds the architecture (here `support:tiny_convnet`); its head is found as the last linear
    layer with one output per label; the merged folder is its own state dict."""
    from finetune.data.images import open_image
    from finetune.evaluation.image_classifier import load_image_classifier, predict_image_logits
    from finetune.merge.images import load_merged_image_model
    from finetune.merge.merging import merge_adapter

    recipe = image_recipe("support:tiny_convnet", toy_images_dir, tmp_path / "out", adapter={"r": 8}, train={"learning_rate": 5e-2, "epochs": 10})
    result = train(recipe)
    assert json.loads((result.output_dir / "train_metrics.json").read_text())["heads"] == ["model.9"]
    report = json.loads((result.output_dir / "eval_metrics.json").read_text())
    assert report["accuracy"] >= 8 / 9
    report = merge_adapter(result.output_dir, tmp_path / "merged")
    assert report.merged_modules == 2  # the stem and the 1x1 convolution; the depthwise one is left out
    merged = load_merged_image_model(tmp_path / "merged", hf=False)
    files = sorted(toy_images_dir.rglob("*.png"))[:6]
    classifier = load_image_classifier(result.output_dir)
    pixels = torch.stack([classifier.preprocessing(open_image(str(f), "")) for f in files])
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=pixels).logits, predict_image_logits(classifier, files), atol=1e-5)


def test_lora_on_same_padding_convolutions_trains_reloads_and_merges(toy_images_dir, tmp_path):
    """1x1 convolutions of an nn.Conv2d subclass that pads in its own forward (PEFT cannot build its LoRA layers with
    such a class) become plain nn.Conv2d with the same weights for training, and again when predict and merge rebuild
    the base; the 3x3 one is not a default target. 22 targets: PEFT saves them as a short suffix."""
    from finetune.data.images import open_image
    from finetune.evaluation.image_classifier import load_image_classifier, predict_image_logits
    from finetune.merge.images import load_merged_image_model
    from finetune.merge.merging import merge_adapter

    recipe = image_recipe("support:tiny_same_padding_net", toy_images_dir, tmp_path / "out", train={"epochs": 1})
    result = train(recipe)
    saved = json.loads((result.output_dir / "adapter_config.json").read_text())["target_modules"]
    assert saved == ["pointwise"]  # saved as a suffix: the reload must match it as PEFT does
    classifier = load_image_classifier(result.output_dir)
    files = sorted(toy_images_dir.rglob("*.png"))[:4]
    logits = predict_image_logits(classifier, files)
    report = merge_adapter(result.output_dir, tmp_path / "merged")
    assert report.merged_modules == 22
    merged = load_merged_image_model(tmp_path / "merged", hf=False)  # the original architecture, subclass and all
    assert type(merged.model.blocks[0].pointwise).__name__ == "SamePaddingConv2d"
    pixels = torch.stack([classifier.preprocessing(open_image(str(f), "")) for f in files])
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=pixels).logits, logits, atol=1e-5)
