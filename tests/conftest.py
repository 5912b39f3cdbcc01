"""Shared fixtures: tiny random models and tokenizers built offline; no network, ever."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before transformers/datasets are imported anywhere in the test session.
_HF_HOME = tempfile.mkdtemp(prefix="finetune-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("FINETUNE_CACHE", str(Path(_HF_HOME) / "finetune"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# DeepSpeed JIT-compiles its CPU communication op once (~1-3 min); keep it in the checkout's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a an is are was what who where when how why which capital color colour of in on at to from and or "
    "paris london rome berlin madrid red green blue yellow black white one two three four five six seven eight "
    "nine ten cat dog bird fish sun moon star tree river sea mountain city country france england italy germany "
    "spain yes no hello hi thanks please good bad big small fast slow question answer user assistant system "
    "you i we they it this that number plus minus equals name my your kit recipe model adapter train"
).split()


def _corpus() -> list[str]:
    lines = [" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS), 6)]
    return lines * 4 + ["user assistant system hello what is the capital of france paris"]


def build_tokenizer(folder: Path, model_max_length: int = 256):
    """A small word-level tokenizer with ChatML specials, trained offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(_corpus(), trainers.WordLevelTrainer(special_tokens=specials + ["\n"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(folder)
    return folder


def build_tiny_llama(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 32) with the tiny tokenizer saved beside it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # With the default 0.02, |logits| stay below ~1 whatever the frozen head sees, so a LoRA on such a
        # small model could never make a confident prediction and "loss falls" would test nothing.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Session-wide tiny Llama checkpoint folder. Treat as read-only."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer random BERT (hidden 32) with a WordPiece tokenizer trained offline."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=128)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """Session-wide tiny BERT encoder folder (no head: classification adds one). Treat as read-only."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
