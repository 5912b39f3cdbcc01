"""`finetune export RUN_OR_MERGED_DIR --format gguf --quant Q --out FILE.gguf`: one verified file for llama.cpp and
Ollama, with a Modelfile and a report beside it."""

from __future__ import annotations

import argparse


HELP = "Export a run or merged model as a GGUF file for llama.cpp and Ollama, verified against the merged model."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="RUN_OR_MERGED_DIR", help="A finetune run folder (merged first) or a `finetune merge` folder."
    )
    parser.add_argument("--format", choices=("gguf",), default="gguf", help="File format (gguf).")
    parser.add_argument(
        "--quant", default="q8_0", choices=("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"),
        help="Tensor type of the file's matrices (norms stay f32); the recipe's export section uses the same names."
    )
    parser.add_argument("--out", required=True, help="The .gguf file to write (its Modelfile and report go beside it).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing file (and its Modelfile, report).")
    parser.add_argument(
        "--tolerance", type=float, help="Largest max |logit difference| accepted against the merged model rounded to "
        "the file's types; default: 1e-3 x the logit scale."
    )


def run(args: argparse.Namespace) -> int:
    from finetune.merge.gguf_export import export_gguf

    report = export_gguf(args.source, args.out, args.quant, overwrite=args.overwrite, tolerance=args.tolerance)
    print_report(report)
    return 0


def print_report(report) -> None:
    v = report.verification
    print(f"Exported {report.source} -> {report.out} ({report.quant}, {report.bytes / 2**20:.1f} MiB, {report.gguf_architecture})")
    if report.merge:
        print(f"  merged first ({report.merge['method']}, {report.merge['dtype']})")
    if "rope" in v:
        print(
            f"  llama3 RoPE: rope_freqs within {v['rope']['rope_freqs']['max_abs_diff']:.2g} of transformers' llama3 "
            "factors; logits compared with the source's RoPE in the read-back config (the GGUF loader reads neither)"
        )
    r = v["rounding"]
    print(
        f"  verified with transformers' GGUF loader: max |logit diff| {v['max_abs_logit_diff']:.3g} <= tolerance "
        f"{v['tolerance']:.3g} against the merged model rounded to {report.quant}; token ids equal on "
        f"{v['tokenizer_texts']} texts"
    )
    print(
        f"  {report.quant} rounding vs the merged model: top-1 agreement {r['top1_agreement']:.1%} of {v['positions']} "
        f"positions, mean KL divergence {r['mean_kl_divergence']:.3g}, max |logit diff| {r['max_abs_logit_diff']:.3g}"
    )
    print(f"  Ollama: ollama create NAME -f {report.out[: -len('.gguf')]}.Modelfile")
    print(f"  llama.cpp: llama-cli -m {report.out} -cnv")
