"""QLoRA and 8-bit training with bitsandbytes, for real on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, build_tiny_llama
from finetune.recipe import validate_recipe
from test_sft import sft_recipe

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama256(tmp_path_factory) -> Path:
    # Each quantized layer carries ~1 KB of constants (code tables); at hidden 64 that is a third of the layer,
    # so the memory ratio is measured at a width where layers look like real ones (still only 1.3M parameters).
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-256"), hidden=256)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory) -> Path:
    # bitsandbytes' CPU 4-bit kernels work on blocks of 64 input features: hidden 32 is too small to quantize.
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64)


def load_quantized(model_dir: Path, bits: int):
    from transformers import AutoModelForCausalLM

    from finetune.adapters import build_bnb_config
    from finetune.runtime import resolve_runtime

    recipe = validate_recipe({**BASE, "model": {"name_or_path": str(model_dir)}, "quantization": {"bits": bits}})
    config = build_bnb_config(recipe, resolve_runtime(recipe))
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config, device_map={"": "cpu"})


def linear_bytes(model, layer_type) -> tuple[int, int]:
    """Bytes the quantized linear weights take as loaded (with their scales) and as fp32."""
    quantized = fp32 = 0
    for module in model.modules():
        if not isinstance(module, layer_type):
            continue
        weight = module.weight
        quantized += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            quantized += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
            if state.nested:
                quantized += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.state2.code.numel() * 4
            fp32 += int(torch.Size(state.shape).numel()) * 4
        else:
            quantized += weight.SCB.numel() * weight.SCB.element_size()
            fp32 += weight.numel() * 4
    return quantized, fp32


def test_4bit_weights_take_at_most_a_sixth(llama256):
    model = load_quantized(llama256, 4)
    quantized, fp32 = linear_bytes(model, bnb.nn.Linear4bit)
    assert fp32 > 0
    assert quantized <= fp32 / 6, (quantized, fp32)


def test_8bit_weights_take_at_most_a_third(llama256):
    model = load_quantized(llama256, 8)
    quantized, fp32 = linear_bytes(model, bnb.nn.Linear8bitLt)
    assert fp32 > 0
    assert quantized <= fp32 / 3, (quantized, fp32)


def quantized_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype in (torch.uint8, torch.int8)}


@pytest.mark.parametrize("bits, adapter", [(4, "qlora"), (8, "lora")])
def test_training_on_quantized_base(llama64, tmp_path, bits, adapter):
    """Loss falls, the quantized base is untouched, and the adapter reloads onto a freshly quantized base."""
    from peft import PeftModel

    from finetune.train import run

    recipe = validate_recipe(
        sft_recipe(llama64, tmp_path, adapter={"type": adapter}, quantization={"bits": bits}, train={"optimizer": "adamw_8bit", "epochs": 5})
    )
    assert recipe.quantization.bits == bits
    result = run(recipe)
    losses = [h["loss"] for h in result.metrics["log_history"] if "loss" in h]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    # An fp32 run trains fp32 adapter weights (TRL would have cast them to bf16; see keep_trainable_fp32).
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    fresh = load_quantized(llama64, bits)
    trained_base = {n.replace("base_model.model.", "").replace(".base_layer", ""): t for n, t in quantized_weights(result.model).items()}
    original = quantized_weights(fresh)
    assert original and set(original) == set(trained_base)
    for name, tensor in original.items():
        assert torch.equal(trained_base[name], tensor), f"quantized base weight {name} changed"

    plan = result.metrics["plan"]
    assert plan["quantization"].startswith(f"{bits}-bit")
    assert plan["weight_mb"] < plan["weight_mb_unquantized"]

    reloaded = PeftModel.from_pretrained(fresh, recipe.output.dir).eval()
    # On CPUs with AVX512-bf16, bitsandbytes repacks 4-bit weights for a faster bf16 inference kernel, but only
    # when the input needs no grad; the trained model (input grads enabled for k-bit training) never takes that
    # path. Both models use the exact kernel here, so any difference is the adapter's, not the kernel's.
    for model in (result.model, reloaded):
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    ids = result.tokenizer("what is the capital of france paris", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def validate_cli(tmp_path: Path, recipe: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(path)], capture_output=True, text=True, cwd=REPO)


BASE = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"}}


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"adapter": "none", "quantization": {"bits": 4}},
            "adapter.type: none (full fine-tune) cannot train a 4-bit model: quantized weights have no gradients. "
            "Use adapter.type: qlora (4-bit) or lora (8-bit), or remove quantization.bits.",
        ),
        (
            {"adapter": "qlora", "quantization": {"bits": 8}},
            "adapter.type: qlora means LoRA on a 4-bit base, but quantization.bits is 8. "
            "For LoRA on an 8-bit base use adapter.type: lora with quantization.bits: 8.",
        ),
        (
            {"task": "classification", "quantization": {"bits": 4, "skip_modules": ["lm_head"]}},
            "quantization.skip_modules must keep the classification head in full precision: a quantized head "
            "cannot be trained or saved. Add the head's name (`classifier` for BERT-style, `score` for Llama-style).",
        ),
        (
            {"quantization": {"bits": 4, "compute_dtype": "float16"}, "train": {"device": "cpu"}},
            "quantization.compute_dtype: float16 on CPU: bitsandbytes' CPU kernels compute in float32 or "
            "bfloat16, and fp16 training is GPU-only. Use quantization.compute_dtype: auto (float32 here) or bfloat16.",
        ),
    ],
)
def test_invalid_combinations_are_refused_before_loading(tmp_path, changes, message):
    (tmp_path / "t.jsonl").write_text("")
    result = validate_cli(tmp_path, {**BASE, **changes, "data": {"train": str(tmp_path / "t.jsonl")}})
    assert result.returncode == 2, result.stdout
    assert f"  - {message}\n" in result.stderr
    assert "Traceback" not in result.stderr


def test_qlora_implies_4bit_defaults():
    recipe = validate_recipe({**BASE, "adapter": "qlora"})
    assert (recipe.quantization.bits, recipe.quantization.quant_type, recipe.quantization.double_quant) == (4, "nf4", True)


def test_paged_optimizer_falls_back_on_cpu_and_says_so_once(tmp_path, caplog):
    from finetune.runtime import resolve_runtime
    from finetune.train import training_arguments
    from transformers import TrainingArguments

    recipe = validate_recipe({**BASE, "train": {"optimizer": "paged_adamw_8bit", "device": "cpu"}})
    with caplog.at_level("WARNING", logger="finetune"):
        args = training_arguments(recipe, resolve_runtime(recipe), tmp_path, has_eval=False, config_class=TrainingArguments)
    assert args.optim == "adamw_bnb_8bit"
    warnings = [r.getMessage() for r in caplog.records if "pages through CUDA memory" in r.getMessage()]
    assert warnings == ["train.optimizer: paged_adamw_8bit pages through CUDA memory; on CPU using adamw_bnb_8bit (same update, unpaged)."]
