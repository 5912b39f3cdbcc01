"""`finetune merge ADAPTER_OR_RUN_DIR --out DIR`: merge an adapter into its base, verify it, save a plain model."""

from __future__ import annotations

import argparse

from finetune.commands.common import recipe_key_help
from finetune.dtypes import NAMES, canonical
from finetune.merge.merging import merge_adapter

HELP = "Merge an adapter into its full-precision base, verify it, and save a plain model."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER_OR_RUN_DIR", help="A PEFT adapter folder or a finetune run folder.")
    parser.add_argument("--out", required=True, help="Folder for the merged model (created; must be empty).")
    parser.add_argument(
        "--base", help="Base model folder or hub id. Default: the adapter's base_model_name_or_path, else the recipe's model."
    )
    parser.add_argument("--dtype", type=canonical, choices=NAMES, help=recipe_key_help("merge.dtype"))
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out folder.")
    parser.add_argument(
        "--no-verify", action="store_true", help=recipe_key_help("merge.verify", lead="Turn off merge.verify: ")
    )
    parser.add_argument("--tolerance", type=float, help=recipe_key_help("merge.tolerance"))
    parser.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        help="Save the merged model as bitsandbytes 4-bit (nf4) or 8-bit weights; merging itself stays full precision.",
    )
    parser.add_argument(
        "--method",
        choices=("streaming", "peft"),
        help="streaming: shard by shard in bounded memory (default; adapters it cannot merge exactly fall back to "
        "peft); peft: merge_and_unload on the whole model in memory.",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="Largest output shard, e.g. 5GB or 500MB (default 5GB).")


def run(args: argparse.Namespace) -> int:
    report = merge_adapter(
        args.adapter,
        args.out,
        base=args.base,
        dtype=args.dtype,
        verify=False if args.no_verify else None,
        tolerance=args.tolerance,
        quantize=args.quantize,
        method=args.method,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    print(f"Merged {report.adapter} into {report.base_name} -> {report.out_dir}")
    print(f"  method {report.method}, {report.dtype}, {report.merged_modules} module(s), {len(report.files)} shard(s)")
    if report.method_note:
        print(f"  note: {report.method_note}")
    if report.update_lost_to_rounding:
        lost = report.update_lost_to_rounding
        print(f"  rounding to {report.dtype} lost up to {lost['max']:.1%} of an update's norm ({lost['module']})")
    if report.verification:
        v = report.verification
        inputs = f"{v['images']} images" if "images" in v else f"{v['tokens']} tokens"
        print(f"  verified: max |logit diff| {v['max_abs_logit_diff']:.3g} <= tolerance {v['tolerance']:.3g} ({inputs})")
    else:
        print("  not verified (verification is off)")
    if report.quantization:
        q = report.quantization
        moved = q.get("max_abs_logit_diff_vs_merged")
        print(f"  saved as {q['bits']}-bit bitsandbytes weights" + (f"; logits moved by up to {moved:.3g}" if moved is not None else ""))
    return 0
