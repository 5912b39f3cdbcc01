"""Peak RSS and time of `finetune export --format gguf` on a synthetic Llama-shaped model: the streamed write alone,
and the whole export (write + verification with transformers' GGUF loader).

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.export                        # ~1B parameters, q8_0
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.export --params 1e8 --quant f16
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.export --run outputs/llama_lora     # every quant of a real run

A child writes a bf16 model of about `--params` parameters (benchmarks/merge.py's shapes, several shards) with a
small byte-level BPE tokenizer, as a `finetune merge` folder looks; then one child writes the GGUF file without
verification (the writer's own memory: one model's tensors streamed, one at a time) and another runs the full
export. Peak RSS is each child's (wait4).

With `--run`, a finished run is merged once and exported at every quant from the merged folder (and twice without
the Q/K permutation, which the verification must refuse): the README's table of what each quant costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BENCH_PREFIX, REPO, machine, offline_env, print_table, run_measured, write_results
from benchmarks.merge import llama_shape, write_base


def write_inputs(work: Path, params: float, shard_size: str) -> dict:
    from transformers.utils.hub import convert_file_size_to_int

    from finetune.models.tokenizer_training import train_bpe

    shape = llama_shape(params)
    total = write_base(work / "model", shape, convert_file_size_to_int(shard_size))
    texts = [f"word{i} and number {i} in a sentence of the corpus." for i in range(2000)]
    tokenizer = train_bpe(texts, shape["vocab_size"])
    tokenizer.save_pretrained(work / "model")
    return {"params": total, "shape": shape, "tokens": len(tokenizer)}


def write_only(work: Path, quant: str) -> dict:
    """The streamed write without verification: what the writer holds."""
    import gguf

    from finetune.merge import gguf_vocab, gguf_writer

    folder = work / "model"
    config = json.loads((folder / "config.json").read_text())
    arch = gguf_writer.architecture_of(config, str(folder))
    started = time.perf_counter()
    plans = gguf_writer.plan_tensors(folder, config, arch, quant)
    writer = gguf.GGUFWriter(work / "write-only.gguf", arch.name)
    gguf_writer.add_hyperparameters(writer, config, arch, quant, "bench")
    gguf_vocab.add_bpe_vocab(writer, folder, config["vocab_size"])
    gguf_writer.write_file(writer, folder, plans)
    size = (work / "write-only.gguf").stat().st_size
    (work / "write-only.gguf").unlink()
    return {"seconds": time.perf_counter() - started, "bytes": size}


def export(work: Path, quant: str) -> dict:
    from finetune.merge.gguf_export import export_gguf

    started = time.perf_counter()
    report = export_gguf(work / "model", work / "out.gguf", quant, overwrite=True)
    return {"seconds": time.perf_counter() - started, "bytes": report.bytes, "verification": report.verification,
            "steps": report.seconds}  # fmt: skip


QUANTS = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def every_quant(run: Path, work: Path) -> None:
    """The run merged once, then exported at every quant; one row each (and the refused unpermuted files)."""
    from finetune.errors import FinetuneError
    from finetune.merge.gguf_export import export_gguf
    from finetune.merge.merging import merge_adapter

    merge_adapter(run, work / "merged")
    rows = []
    for quant, permute in [(q, True) for q in QUANTS] + [("f16", False), ("q4_0", False)]:
        try:
            report = export_gguf(work / "merged", work / f"{quant}.gguf", quant, overwrite=True, permute_qk=permute)
        except FinetuneError as e:
            rows.append([f"{quant}, Q/K not permuted", "refused", str(e).split("by up to ")[1].split(",")[0], "", "", "", ""])
            continue
        v, r, t = report.verification, report.verification["rounding"], report.seconds
        rows.append([quant, f"{report.bytes / 2**20:.1f} MiB", f"{v['max_abs_logit_diff']:.3g}", f"{r['max_abs_logit_diff']:.3g}",
                     f"{r['mean_kl_divergence']:.2g}", f"{r['top1_agreement']:.0%}", f"{t['write']:.0f} s + {t['verify']:.0f} s"])  # fmt: skip
    print_table(["quant", "file", "file vs rounded: max |logit diff|", "rounding: max |logit diff|",
                 "rounding: mean KL (nats)", "rounding: top-1 agreement", "write + verify"], rows)  # fmt: skip
    if importlib.util.find_spec("llama_cpp") is not None:
        print_table(["quant", "llama.cpp: mean KL from its f16 run", "llama.cpp: top-1 agreement"], llama_cpp_rows(work))


def llama_cpp_rows(work: Path) -> list[list]:
    """Each file run by llama.cpp itself (llama-cpp-python) on one chat prompt, against its run of the f16 file."""
    import llama_cpp
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "merged")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "The capital of France is Paris. Write one sentence about the sea and the mountains."}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    scores = {}
    for quant in QUANTS:
        llm = llama_cpp.Llama(str(work / f"{quant}.gguf"), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.eval(ids)
        scores[quant] = np.array(llm.scores[: len(ids)], dtype=np.float64)
        del llm

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    reference = log_softmax(scores["f16"])
    rows = []
    for quant, s in scores.items():
        kl = (np.exp(reference) * (reference - log_softmax(s))).sum(-1)
        rows.append([quant, f"{kl.mean():.2g}", f"{(s.argmax(-1) == scores['f16'].argmax(-1)).mean():.0%}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="Approximate model size (default 1e9).")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--workdir", type=Path, help="Folder for the synthetic model and file (default: a temp folder, removed).")
    parser.add_argument("--out", type=Path, help="JSON figures (default benchmarks/results/export.json).")
    parser.add_argument("--run", type=Path, help="A finished run: export it at every quant (the README's table).")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        what, work = args.child[0], Path(args.child[1])
        if what == "write":
            result = write_inputs(work, args.params, args.shard_size)
        else:
            result = write_only(work, args.quant) if what == "write-only" else export(work, args.quant)
        print(BENCH_PREFIX + json.dumps(result))
        return

    if args.run:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
        try:
            every_quant(args.run, work)
        finally:
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        return
    info = machine()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    child = [sys.executable, "-m", "benchmarks.export", "--params", str(args.params), "--quant", args.quant,
             "--shard-size", args.shard_size, "--child"]  # fmt: skip
    try:
        inputs = run_measured([*child, "write", str(work)], env=offline_env(), cwd=REPO).check("writing the synthetic model").report
        shape = inputs["shape"]
        print(f"Synthetic Llama: {inputs['params'] / 1e9:.3f}B parameters ({shape['num_hidden_layers']} layers, hidden "
              f"{shape['hidden_size']}), bf16 safetensors {sum(p.stat().st_size for p in (work / 'model').glob('*.safetensors')) / 2**30:.2f} GiB", file=sys.stderr)  # fmt: skip
        rows, results = [], {}
        for what in ("write-only", "export"):
            measured = run_measured([*child, what, str(work)], env=offline_env(), cwd=REPO).check(what)
            results[what] = {**measured.report, "peak_rss_mb": measured.peak_rss_mb, "wall_s": measured.wall_s}
            rows.append([what, f"{measured.report['seconds']:.0f}", f"{measured.peak_rss_mb:.0f}",
                         f"{measured.report['bytes'] / 2**20:.0f}"])  # fmt: skip
        print_table(["step", "seconds", "peak RSS (MiB)", "file (MiB)"], rows)
        path = write_results("export", {"machine": info, "inputs": inputs, "quant": args.quant, "results": results}, args.out)
        print(f"Figures: {path}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
