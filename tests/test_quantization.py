"""QLoRA and 8-bit training with bitsandbytes, for real on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.recipe import validate_recipe
from support import REPO, build_tiny_llama, capitals_data, sft_recipe

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama256(tmp_path_factory) -> Path:
    # Each quantized layer carries ~1 KB of constants (code tables); at hidden 64 that is a third of the layer,
    # so the memory ratio is measured at a width where layers look like real ones (still only 1.3M parameters).
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-256"), hidden=256)


def load_quantized(model_dir: Path, bits: int):
    from transformers import AutoModelForCausalLM

    from finetune.models.quantization import build_bnb_config
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

    from finetune.models.quantization import use_exact_4bit_kernels
    from finetune.runner import run

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
    # On CPUs with AVX512-bf16, bitsandbytes would repack the fresh model's 4-bit weights for its bf16 inference
    # kernel; the trained model keeps the exact kernel (see use_exact_4bit_kernels). Both use it here, so any
    # difference is the adapter's, not the kernel's.
    use_exact_4bit_kernels(reloaded)
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
            {"quantization": {"bits": 4, "compute_dtype": "float16"}, "train": {"device": "cpu"}},  # torch's spelling
            "quantization.compute_dtype: fp16 on CPU: bitsandbytes' CPU kernels compute in fp32 or bf16, and fp16 "
            "training is GPU-only. Use quantization.compute_dtype: auto (fp32 here) or bf16.",
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
    from finetune.training.arguments import training_arguments
    from transformers import TrainingArguments

    recipe = validate_recipe({**BASE, "train": {"optimizer": "paged_adamw_8bit", "device": "cpu"}})
    with caplog.at_level("WARNING", logger="finetune"):
        args = training_arguments(recipe, resolve_runtime(recipe), tmp_path, has_eval=False, config_class=TrainingArguments)
    assert args.optim == "adamw_bnb_8bit"
    warnings = [r.getMessage() for r in caplog.records if "pages through CUDA memory" in r.getMessage()]
    assert warnings == ["train.optimizer: paged_adamw_8bit pages through CUDA memory; on CPU using adamw_bnb_8bit (same update, unpaged)."]


# --------------------------------------------------------------------------------------------
# Gradients against a reference: an fp32 model holding the dequantized weights, with the same adapter
# --------------------------------------------------------------------------------------------
# A loss still falls when gradients are partly wrong, so these tests compare the gradients themselves. They run on
# this CPU as it is, and as if it had AVX512-bf16: there bitsandbytes 0.50 repacks 4-bit weights for an inference
# kernel without autograd the first time a layer runs in eval mode without grad (any evaluation), and every later
# training step loses the gradient through the frozen 4-bit layers (relative error ~1, against ~0 here).

# Largest relative difference (norm of the difference over the reference's norm, per adapter tensor) accepted.
# 4-bit: the quantized layers compute with exactly the dequantized weights (measured 0). 8-bit: LLM.int8 also
# quantizes the activations in the forward pass (measured 4e-6 on this model).
GRADIENT_TOLERANCE = {4: 1e-4, 8: 1e-3}


@pytest.fixture(params=["this cpu", "avx512-bf16"])
def cpu_kind(request, monkeypatch):
    """Run on this CPU as it is, and as if it had AVX512-bf16 (bitsandbytes' gate for its repacking)."""
    if request.param == "avx512-bf16":
        import bitsandbytes.nn.modules

        # Linear4bit reads this when constructed; the pin below fails if bitsandbytes stops gating on it.
        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    return request.param


def test_bitsandbytes_still_gates_cpu_repacking_on_the_flag_the_kit_clears():
    """The kit's fix clears `Linear4bit.support_avx512bf16_for_cpu`; a bitsandbytes that gates elsewhere must fail here."""
    import inspect

    source = inspect.getsource(bnb.nn.Linear4bit.forward)
    assert "self.support_avx512bf16_for_cpu" in source and "_convert_weight_packed_for_cpu" in source


def dequantized_reference(model_dir: Path, quantized):
    """An fp32 model whose linear weights are exactly what the quantized model's layers compute with."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in quantized.named_modules():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = module.weight.data.float() * module.weight.SCB[:, None] / 127
        else:
            continue
        reference.get_submodule(name).weight.data.copy_(weight)
    return reference


def with_adapter_values(reference, recipe, values: dict[str, torch.Tensor]):
    """The reference with the recipe's LoRA attached, set to `values` (adapter tensors by name)."""
    from finetune.models.adapters import attach_adapter

    plain = validate_recipe({**recipe.model_dump(), "quantization": {}, "adapter": {**recipe.adapter.model_dump(), "type": "lora"}})
    reference = attach_adapter(reference, plain, task_type="CAUSAL_LM")
    params = dict(reference.named_parameters())
    assert set(values) == {n for n, p in params.items() if p.requires_grad}
    for name, value in values.items():
        params[name].data.copy_(value)
    return reference


def adapter_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch, use_cache=False).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def largest_relative_difference(actual: dict, expected: dict) -> float:
    assert set(actual) == set(expected) and expected
    for name, grad in expected.items():
        assert grad.norm() > 0, f"reference gradient of {name} is zero: the comparison would prove nothing"
    return max(((actual[n] - expected[n]).norm() / expected[n].norm()).item() for n in expected)


@pytest.mark.parametrize("bits, adapter", [(4, "qlora"), (8, "lora")])
def test_quantized_gradients_match_reference_before_and_after_evaluation(llama64, tmp_path, cpu_kind, bits, adapter):
    from transformers import AutoModelForCausalLM

    from finetune.models.adapters import attach_adapter
    from finetune.models.loading import load_model
    from finetune.runtime import resolve_runtime

    recipe = validate_recipe(sft_recipe(llama64, tmp_path, adapter={"type": adapter, "r": 4}, quantization={"bits": bits}))
    model = load_model(recipe, resolve_runtime(recipe), str(llama64), AutoModelForCausalLM)
    model = attach_adapter(model, recipe, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at initialisation: give it values so gradients reach lora_A and the layers below
            param.data.normal_(0, 0.1)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = with_adapter_values(dequantized_reference(llama64, model), recipe, values)
    ids = torch.randint(6, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    expected = adapter_gradients(reference, batch)

    before = largest_relative_difference(adapter_gradients(model, batch), expected)
    model.eval()  # what every evaluation and `generate` do
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    after = largest_relative_difference(adapter_gradients(model, batch), expected)
    assert before < GRADIENT_TOLERANCE[bits] and after < GRADIENT_TOLERANCE[bits], (before, after)


def test_qlora_run_trains_on_correct_gradients_after_eval_on_start(llama64, tmp_path, cpu_kind):
    """Through the kit's own training path: evaluations (before step 1, after it) must not change the gradients."""
    from transformers import TrainerCallback

    from finetune.runner import run

    class SecondStep(TrainerCallback):
        """Adapter values and gradients at step 2, before the optimizer changes them (clipping is off).

        Step 2, not 1: LoRA's B starts at zero, so at step 1 no gradient reaches A or flows through the adapters.
        """

        captured: dict = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                self.captured = {
                    "values": {n: p.detach().clone() for n, p in params},
                    "grads": {n: p.grad.detach().clone() for n, p in params},
                }

    rows = 8  # one batch holds every training row, so each step sees a known batch whatever the shuffling
    data = tmp_path / "data"
    data.mkdir()
    recipe = validate_recipe(
        sft_recipe(
            llama64,
            tmp_path,
            adapter={"type": "qlora", "r": 4},
            data={"train": str(capitals_data(data / "train.jsonl", rows)), "eval": str(capitals_data(data / "eval.jsonl", 4))},
            train={"max_steps": 2, "micro_batch_size": rows, "max_grad_norm": 0.0, "eval_steps": 1},
        )
    )
    probe = SecondStep()
    result = run(recipe, callbacks=[probe])
    evaluated_at = [h["step"] for h in result.metrics["log_history"] if "eval_loss" in h]
    assert evaluated_at[:2] == [0, 1], evaluated_at
    assert probe.captured, "the callback saw no step"

    trainer = result.trainer
    trainer_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    reference = with_adapter_values(dequantized_reference(llama64, result.model), recipe, probe.captured["values"])
    expected = adapter_gradients(reference, trainer_batch)
    difference = largest_relative_difference(probe.captured["grads"], expected)
    assert difference < GRADIENT_TOLERANCE[4], difference


def test_training_stops_when_a_4bit_layer_was_repacked(llama64, tmp_path):
    """If a future bitsandbytes repacks despite the kit, the run stops with a message instead of training on."""
    from transformers import AutoModelForCausalLM

    from finetune.models.adapters import attach_adapter
    from finetune.models.loading import load_model
    from finetune.errors import FinetuneError
    from finetune.runtime import resolve_runtime
    from finetune.training.callbacks import quantized_weights_guard

    recipe = validate_recipe(sft_recipe(llama64, tmp_path, adapter="qlora"))
    model = attach_adapter(load_model(recipe, resolve_runtime(recipe), str(llama64), AutoModelForCausalLM), recipe, "CAUSAL_LM")
    guard = quantized_weights_guard()
    guard.on_evaluate(None, None, None, model=model)  # nothing repacked: no complaint
    layer = model.get_submodule("base_model.model.model.layers.1.mlp.up_proj.base_layer")
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    with pytest.raises(FinetuneError, match=r"repacked 1 4-bit layer\(s\) \(base_model\.model\.model\.layers\.1\.mlp\.up_proj\.base_layer"):
        guard.on_evaluate(None, None, None, model=model)
