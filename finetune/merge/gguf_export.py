"""`finetune export --format gguf`: a run or merged model written as one GGUF file for llama.cpp, Ollama, LM Studio.

The flow reads top to bottom: what the source is (an adapter run, or a `finetune merge` folder) → every check that
needs no model (architecture, quant, tokenizer, output path, free disk) → for a run, the merge as `finetune merge`
does it, verified, into a temporary folder → the file written tensor by tensor into a temporary file beside the output
→ the file read back with transformers' own GGUF loader and compared with the merged model (logits, top-1, token ids)
→ Modelfile and export_report.json → the file renamed into place. A failed check publishes nothing.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.merge import gguf_vocab, gguf_writer, modelfile
from finetune.training.memory import peak_rss_bytes

log = logging.getLogger(__name__)

# How far the file's logits may be from the merged model's with every weight rounded as the file rounds it (both run
# in fp32 on the same token ids, weights dequantized by gguf's code either way), as a share of the logit scale
# max(1, max |logit|). What remains is fp32 summation order, ~1e-6 of the scale; a wrong Q/K row order, tensor name,
# norm epsilon or RoPE base moves the logits by a large part of the scale (tests/test_export.py: 0.7 of it).
RELATIVE_TOLERANCE = 1e-3
# Llama 3.1's rope_freqs (F32) against transformers' llama3 RoPE: fp32 rounding of factors up to `factor` (8, 32).
ROPE_FREQS_TOLERANCE = 1e-6
READ_BACK_ROPE = (
    "transformers' GGUF loader reads neither rope_freqs nor llama3 scaling: the logits were compared with the "
    "source's rope_parameters put into the read-back config, and rope_freqs checked against transformers' llama3 RoPE"
)
# Texts whose token ids must be the same from the file's tokenizer as from the merged model's.
TOKENIZER_TEXTS = (
    "The capital of France is Paris.",
    "Grüße aus Köln: naïve café, déjà vu — ½ ≠ ∞.",
    "我想在apple工作1314151天～ нещо на Български",
    "Emoji: 🚀 😶‍🌫️ 🦙🦙 ✅",
    "  leading spaces,\ttabs\nand\n\nnew lines   ",
    "I've been 'told he's there, 'RE you sure? 3.14 3333333",
)


@dataclass
class ExportReport:
    """Everything `<file>.export_report.json` records."""

    out: str
    source: str
    source_kind: str  # "run" or "merged"
    merge: dict | None
    architecture: str
    gguf_architecture: str
    quant: str
    tensors: int
    tensor_types: dict
    bytes: int
    tokenizer: dict
    verification: dict
    modelfile: dict
    seconds: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    versions: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Source:
    folder: Path
    kind: str
    config: dict
    tokenizer_dir: Path | None
    source_gguf: Path | None
    name: str
    weights_dir: Path  # where the tensors come from: the merged folder, or a run's base (merged first)


def side_files(out: Path) -> tuple[Path, Path]:
    """The Modelfile and report beside `out` (named after it, so several quants share a folder)."""
    return out.with_name(out.stem + ".Modelfile"), out.with_name(out.stem + ".export_report.json")


def check_out(out: Path, overwrite: bool) -> Path:
    out = out.resolve()
    if out.suffix != ".gguf":
        raise FinetuneError(f"--out {out}: name the file with a .gguf suffix.")
    if out.is_dir():
        raise FinetuneError(f"--out {out} is a folder; give the file's path, e.g. {out / 'model.gguf'}.")
    existing = [p for p in (out, *side_files(out)) if p.exists()]
    if existing and not overwrite:
        raise FinetuneError(f"--out {existing[0]} exists; pass --overwrite to replace it.")
    return out


def _source_gguf(recipe) -> Path | None:
    """The GGUF file the run's base came from, when it did."""
    if recipe is None or not recipe.model.gguf_file:
        return None
    from finetune.models.checkpoint import local_name

    path = Path(local_name(recipe.model)) / recipe.model.gguf_file
    return path if path.is_file() else None


def resolve_source(source: Path) -> _Source:
    """An adapter run (merged first) or a merged model folder; anything else is refused."""
    from finetune.recipe import load_recipe

    if (source / "adapter_config.json").is_file():
        from finetune.merge.plan import resolve_inputs

        inputs = resolve_inputs(source, None)
        if inputs.task_type != "CAUSAL_LM":
            raise FinetuneError(f"{source}: a {inputs.task_type} adapter; GGUF export writes causal language models.")
        config = json.loads((inputs.base_dir / "config.json").read_text())
        return _Source(source, "run", config, inputs.tokenizer_dir, _source_gguf(inputs.recipe), inputs.base_name, inputs.base_dir)
    if (source / "config.json").is_file():
        if not any((source / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
            raise FinetuneError(f"{source}: no safetensors weights; export a `finetune merge` folder or a run folder.")
        recipe = load_recipe(source / "recipe.yaml") if (source / "recipe.yaml").is_file() else None
        name = recipe.model.name_or_path if recipe is not None else source.name
        tokenizer = source if (source / "tokenizer_config.json").is_file() else None
        config = json.loads((source / "config.json").read_text())
        return _Source(source, "merged", config, tokenizer, _source_gguf(recipe), name, source)
    raise FinetuneError(
        f"{source}: not a finetune run (no adapter_config.json) nor a merged model (no config.json); "
        "give a run folder or a `finetune merge` output folder."
    )


def _check_disk(out: Path, need: int) -> None:
    existing = next(p for p in out.parents if p.exists())  # the folder is created later, on this disk
    free = shutil.disk_usage(existing).free
    if free < need:
        raise FinetuneError(
            f"--out {out}: the export needs about {need / 2**30:.2f} GiB on that disk and {free / 2**30:.2f} GiB is "
            "free; free some space or write elsewhere."
        )


def export_gguf(
    source: str | Path, out: str | Path, quant: str = "q8_0", *, overwrite: bool = False,
    tolerance: float | None = None, permute_qk: bool = True,
) -> ExportReport:  # fmt: skip
    """Write `source` (a run folder or a merged model folder) as a verified GGUF file at `out`.

    Raises FinetuneError, publishing nothing, for an unsupported architecture, quant or tokenizer, an existing `out`
    (without `overwrite`), too little disk, or a file whose logits or token ids differ from the merged model's.
    `permute_qk=False` leaves out llama.cpp's Q/K row order: only to show that the verification catches it.
    """
    started = time.perf_counter()
    out = check_out(Path(out), overwrite)  # the quick checks first: torch is not imported yet
    gguf_writer.quant_type(quant)
    src = resolve_source(Path(source))
    where = str(src.folder / "config.json") if src.kind == "merged" else f"{src.name} (base of {src.folder})"
    arch = gguf_writer.architecture_of(src.config, where)
    if src.tokenizer_dir is None and src.source_gguf is None:
        raise FinetuneError(f"{src.folder}: no tokenizer found (run, base or merged folder); a GGUF file needs one.")
    if src.tokenizer_dir is not None:
        gguf_vocab.check_tokenizer(src.tokenizer_dir, src.source_gguf)
    estimate = _estimate_bytes(src, quant)
    _check_disk(out, estimate)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    merge_tmp = None
    try:
        seconds = {}
        merge = None
        folder = src.folder
        if src.kind == "run":
            from finetune.merge.merging import merge_adapter

            t0 = time.perf_counter()
            # `finetune merge` refuses a folder inside the run: when the file goes into the run folder (the
            # recipe's export), the merged model goes beside the run instead.
            inside = src.folder.resolve() in out.parents
            beside = src.folder.resolve().parent if inside else out.parent
            merge_tmp = Path(tempfile.mkdtemp(dir=beside, prefix=f".{out.name}.merged-"))
            folder = merge_tmp / "merged"
            merged = merge_adapter(src.folder, folder)
            merge = {"method": merged.method, "dtype": merged.dtype, "verification": merged.verification}
            seconds["merge"] = round(time.perf_counter() - t0, 2)
        config = json.loads((folder / "config.json").read_text())

        t0 = time.perf_counter()
        file = tmp / out.name
        plans, vocab = _write(file, folder, config, arch, quant, src, permute_qk)
        seconds["write"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        verification = verify_file(folder, file, quant, plans, tolerance)
        seconds["verify"] = round(time.perf_counter() - t0, 2)
        if not verification["passed"]:
            raise FinetuneError(f"verification failed: {verification['failure']}. Nothing was written to {out}.")

        model_file, report_file = side_files(out)
        chat = _modelfile_text(folder if (folder / "tokenizer_config.json").is_file() else None, out.name, vocab)
        (tmp / model_file.name).write_text(chat["text"])
        seconds["total"] = round(time.perf_counter() - started, 2)
        types: dict = {}
        for p in plans:
            types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
        report = ExportReport(
            out=str(out), source=str(src.folder), source_kind=src.kind, merge=merge,
            architecture=(config.get("architectures") or ["?"])[0], gguf_architecture=arch.name, quant=quant,
            tensors=len(plans), tensor_types=types, bytes=file.stat().st_size, tokenizer=asdict(vocab),
            verification=verification, modelfile={k: v for k, v in chat.items() if k != "text"}, seconds=seconds,
            peak_rss_bytes=peak_rss_bytes(), versions=_versions(),
        )  # fmt: skip
        (tmp / report_file.name).write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")
        # The file last: a reader that sees it sees it whole and verified, with its Modelfile and report beside it.
        os.replace(tmp / model_file.name, model_file)
        os.replace(tmp / report_file.name, report_file)
        os.replace(file, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if merge_tmp is not None:
            shutil.rmtree(merge_tmp, ignore_errors=True)
    return report


def _estimate_bytes(src: _Source, quant: str) -> int:
    """Bytes the export writes: the file (from the tensor shapes), plus the merged model for a run (fp32, the most a
    merge writes), plus 5% and 64 MiB for the header and the tokenizer."""
    from finetune.merge.plan import has_safetensors

    folder = src.weights_dir
    arch = gguf_writer.architecture_of(src.config, str(folder))
    plans = gguf_writer.plan_tensors(folder, src.config, arch, quant) if has_safetensors(folder) else []
    size = sum(p.nbytes for p in plans)
    if src.kind == "run":
        import math

        size += sum(4 * math.prod(p.shape) for p in plans)
    return int(size * 1.05) + 64 * 2**20


def _write(file: Path, folder: Path, config: dict, arch, quant: str, src: _Source, permute_qk: bool):
    import gguf

    plans = gguf_writer.plan_tensors(folder, config, arch, quant, permute=permute_qk)
    writer = gguf.GGUFWriter(file, arch.name)
    gguf_writer.add_hyperparameters(writer, config, arch, quant, Path(src.name).name)
    vocab_size = config["vocab_size"]
    if src.source_gguf is not None and gguf_vocab.source_vocab_size(src.source_gguf) == vocab_size:
        vocab = gguf_vocab.carry_over_vocab(writer, src.source_gguf, folder if src.tokenizer_dir is not None else None)
    else:
        if src.source_gguf is not None:
            log.warning("The run resized the vocabulary: the tokenizer is written from tokenizer.json, not carried over.")
        vocab = gguf_vocab.add_vocab(writer, folder, vocab_size)
    gguf_writer.write_file(writer, folder, plans)
    return plans, vocab


def _load_gguf(file: Path, rope_parameters: dict | None = None):
    """The file as transformers' GGUF loader reads it. `rope_parameters` replaces the RoPE it reads: the loader reads
    neither llama.cpp's rope_freqs tensor nor llama3 scaling, so a Llama 3.1 file is run with the source's RoPE
    (and its rope_freqs tensor is checked on its own, against transformers' llama3 RoPE: `_check_rope_freqs`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    from finetune.models.loading import quiet_transformers

    with quiet_transformers():
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
        if rope_parameters is not None:
            config.rope_parameters = dict(rope_parameters)
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, config=config, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=file.name, dequantize=True),
        )  # fmt: skip
    return model.eval()


def _check_rope_freqs(folder: Path, file: Path) -> dict:
    """The file's rope_freqs tensor (read with gguf's reader) against transformers' own llama3 RoPE for the merged
    model's config: each factor must equal default inv_freq / llama3 inv_freq, within ROPE_FREQS_TOLERANCE."""
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(folder)
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    expected = default.double().numpy() / scaled.double().numpy()
    tensor = next((t for t in GGUFReader(file).tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None or tensor.data.size != expected.size:
        found = "missing" if tensor is None else f"{tensor.data.size} values"
        return {"max_abs_diff": None, "failure": f"rope_freqs.weight is {found}; llama3 RoPE needs {expected.size}"}
    diff = float(np.abs(np.asarray(tensor.data, dtype=np.float64).reshape(-1) - expected).max())
    failure = None
    if diff > ROPE_FREQS_TOLERANCE:
        failure = (f"the file's rope_freqs differ from transformers' llama3 RoPE factors by up to {diff:.4g}, over "
                   f"{ROPE_FREQS_TOLERANCE:g}")  # fmt: skip
    return {"max_abs_diff": diff, "tolerance": ROPE_FREQS_TOLERANCE, "failure": failure}


def verify_file(folder: Path, file: Path, quant: str, plans: list, tolerance: float | None) -> dict:
    """Read the file back with transformers' GGUF loader (independent of the writer: its own tensor names, Q/K order,
    metadata and tokenizer) and compare it with the merged model whose weights are rounded as the file's types round
    them: next-token logits within the tolerance, top-1 equal wherever the rounded model's lead is more than twice
    the tolerance, and equal token ids on TOKENIZER_TEXTS. Rounding itself is then measured against the unrounded
    merged model (max |logit diff|, KL divergence, top-1 agreement) and reported, not judged: it is the quant's price,
    which `--quant` chooses."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune.merge import verify as merge_verify
    from finetune.models.loading import quiet_transformers

    with quiet_transformers():
        merged_tokenizer = AutoTokenizer.from_pretrained(folder)
        file_tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    texts = list(TOKENIZER_TEXTS)
    if merged_tokenizer.chat_template:
        texts.append(merged_tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TOKENIZER_TEXTS[1]},
             {"role": "assistant", "content": "Bonjour 🚀"}, {"role": "user", "content": "Again?"}],
            tokenize=False, add_generation_prompt=True))  # fmt: skip
    token_mismatch = next(
        (t for t in texts if merged_tokenizer(t)["input_ids"] != file_tokenizer(t)["input_ids"]), None
    )

    config = json.loads((folder / "config.json").read_text())
    rope = None
    if gguf_writer.rope_settings(config)["rope_type"] == "llama3":
        rope = {"rope_type": "llama3", "rope_freqs": _check_rope_freqs(folder, file), "read_back": READ_BACK_ROPE}
    ids = merge_verify.verification_inputs(folder, list(merge_verify.DEFAULT_PROMPTS), config["vocab_size"])
    model = merge_verify.load_merged(folder, AutoModelForCausalLM, dtype=torch.float32)
    merged = merge_verify.logits_of(model, ids)
    _round_like_file(model, plans)
    rounded = merge_verify.logits_of(model, ids)
    del model  # one model in memory at a time
    gc.collect()
    file_model = _load_gguf(file, AutoConfig.from_pretrained(folder).rope_parameters if rope else None)
    logits = merge_verify.logits_of(file_model, ids)
    del file_model
    gc.collect()

    scale = max(float(r.abs().max()) for r in rounded)
    diff = _max_diff(rounded, logits)
    rule = "given (--tolerance)"
    if tolerance is None:
        tolerance = RELATIVE_TOLERANCE * max(1.0, scale)
        rule = f"{RELATIVE_TOLERANCE:g} x max(1, max |logit|) of the merged model rounded to the file's types"
    positions = decisive = decisive_agree = 0
    for r, g in zip(rounded, logits):
        top2 = r[0].topk(2, dim=-1).values
        sure = top2[:, 0] - top2[:, 1] > 2 * tolerance
        same = r[0].argmax(-1) == g[0].argmax(-1)
        positions += len(same)
        decisive += int(sure.sum())
        decisive_agree += int((same & sure).sum())
    failure = None
    if rope is not None and rope["rope_freqs"]["failure"]:
        failure = rope["rope_freqs"]["failure"]
    elif token_mismatch is not None:
        failure = f"the file's tokenizer gives other token ids than the merged model's for {token_mismatch[:60]!r}"
    elif diff > tolerance:
        failure = (f"the file's logits differ from the merged model's (rounded to {quant}) by up to {diff:.4g}, over "
                   f"the tolerance {tolerance:.4g} ({rule})")  # fmt: skip
    elif decisive_agree < decisive:
        failure = (f"the file's top-1 token differs at {decisive - decisive_agree} of {decisive} positions where the "
                   "merged model's lead exceeds twice the tolerance")  # fmt: skip
    return {
        "prompts": len(ids), "positions": positions, "max_abs_logit_diff": diff, "max_abs_logit": scale,
        "tolerance": tolerance, "tolerance_rule": rule,
        "decisive_positions": decisive, "decisive_top1_agreement": decisive_agree / decisive if decisive else 1.0,
        "tokenizer_texts": len(texts), "tokenizer_ids_equal": token_mismatch is None,
        "rounding": _rounding_effect(merged, logits), **({"rope": rope} if rope else {}),
        "passed": failure is None, "failure": failure,
    }  # fmt: skip


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _round_like_file(model, plans: list) -> None:
    """Each weight the file stores below fp32 replaced by its value there: quantized and dequantized by gguf's own
    code (rounding works on whole rows, so llama.cpp's Q/K row order does not change it)."""
    import torch
    from gguf.quants import dequantize, quantize

    params = dict(model.named_parameters())
    with torch.no_grad():
        for plan in plans:
            if plan.qtype.name == "F32":
                continue
            param = params[plan.source]  # a name transformers loads differently would be a KeyError, not a pass
            rounded = dequantize(quantize(param.detach().numpy(), plan.qtype), plan.qtype)
            param.copy_(torch.from_numpy(rounded.reshape(param.shape)))


def _rounding_effect(merged: list, logits: list) -> dict:
    """How far the file's rounding moves the merged model: logits, next-token distributions, top-1 tokens."""
    import torch

    kld, agree, positions = [], 0, 0
    for m, g in zip(merged, logits):
        log_p, log_q = torch.log_softmax(m[0].double(), -1), torch.log_softmax(g[0].double(), -1)
        kld.append((log_p.exp() * (log_p - log_q)).sum(-1))
        same = m[0].argmax(-1) == g[0].argmax(-1)
        agree += int(same.sum())
        positions += len(same)
    kld = torch.cat(kld)
    return {
        "max_abs_logit_diff": _max_diff(merged, logits), "mean_kl_divergence": float(kld.mean()),
        "max_kl_divergence": float(kld.max()), "top1_agreement": agree / positions,
    }  # fmt: skip


def _modelfile_text(tokenizer_dir: Path | None, file_name: str, vocab: gguf_vocab.VocabNotes) -> dict:
    pieces, specials = None, []
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        pieces = modelfile.chat_pieces(tokenizer)
        specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()))
    stops = modelfile.stop_tokens(pieces, specials, vocab.eos_token)
    note = None if pieces else "no TEMPLATE: the chat template does not decompose into per-role text; Ollama reads the GGUF's"
    return {"text": modelfile.modelfile(file_name, pieces, stops), "template": pieces is not None, "stops": stops, "note": note}


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("gguf", "transformers", "torch")}


def export_finished_run(recipe, run_dir: Path) -> ExportReport:
    """The recipe's `export:` section at the end of `finetune train`: the run folder exported as `finetune export`
    would, into export.out (default `<run>/<run name>-<quant>.gguf`), replacing an earlier export of this run."""
    e = recipe.export
    out = Path(e.out) if e.out else run_dir / f"{run_dir.name}-{e.quant}.gguf"
    report = export_gguf(run_dir, out, e.quant, overwrite=True)
    v = report.verification
    print(
        f"Exported {out} ({e.quant}, {report.bytes / 2**20:.1f} MiB): max |logit diff| {v['max_abs_logit_diff']:.3g} "
        f"<= {v['tolerance']:.3g}; {e.quant} rounding: top-1 agreement {v['rounding']['top1_agreement']:.1%}",
        flush=True,
    )
    return report
