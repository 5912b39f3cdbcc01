"""The data report (`finetune data`): the rows as training will read them, seen as a whole before paying for training.

A task's `data_facts` hook reads its rows exactly as its `prepare_data` does (same reading, templating, masking,
truncation and split) and gives one `RowFacts` per row; this module keeps what it needs of each row in flat numpy
columns (lengths, a 64-bit exact-duplicate key, a 256-byte MinHash signature) and never the rows themselves, so a
million rows fit in well under a gigabyte. From those columns: length distributions per split with `max_length`
marked, what truncation drops and cuts, what the batches will look like, duplicates within the training split and
held-out rows that repeat training rows (leakage), label balance, and a verdict. The first rows are kept rendered
(trained tokens marked). `Report.write` puts `data_report.md`, `.json`, `.html` and PNG histograms in a folder.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from finetune.data import duplicates
from finetune.data.cache import code_digest, file_digest, fingerprint, read_json, write_json
from finetune.data.rows import is_local, local_path
from finetune.errors import FinetuneError

SPLITS = ("train", "eval")
LISTED_PAIRS = 1000  # pairs kept in data_report.json (all are counted); the markdown and HTML show the first 20
SHOWN = 20
BATCHINGS = ("padded", "padding_free", "packed", "blocks", "images", "pairs")  # pairs: chosen and rejected padded together


@dataclass
class RowFacts:
    """One row as training reads it. Token counts are before truncation; `kept` and `trained_kept` what training
    keeps of the row (0 when it drops the row). `ids`/`trained_mask` render the row (only the first few are kept)."""

    split: str  # "train" or "eval"
    origin: str  # "FILE, row N", as problems name rows
    text: str | None = None  # what duplicates are judged on; None: not compared
    key: int | None = None  # the exact-duplicate key when the task has a better one than the text (an image's bytes)
    tokens: int = 0
    trained: int = 0  # tokens that carry a loss (all tokens for a classifier: it reads them all for its label)
    kept: int = 0
    trained_kept: int = 0
    dropped: bool = False  # training leaves the row out (nothing to learn within max_length)
    labels: tuple[str, ...] = ()
    ids: list[int] | None = None
    trained_mask: list[bool] | None = None


@dataclass
class Tally:
    """Unusable rows met while reading (as `Rows` counts them)."""

    skipped: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class DataFacts:
    """What a task's `data_facts` hook gives the report: its rows (an iterable read once) and how training batches them."""

    rows: Iterable[RowFacts]
    batching: str  # one of BATCHINGS
    max_length: int | None
    micro_batch_size: int
    tally: Tally = field(default_factory=Tally)  # filled while `rows` is read
    decode: Callable[[list[int]], str] | None = None  # ids -> text, to render the first rows
    trains_on: str = "tokens"  # "tokens" (a language model) or "labels" (a classifier)
    drop_stops_training: bool = False  # data.on_bad_row: error: a dropped row stops the run instead
    notes: list[str] = field(default_factory=list)  # the task's own findings (a check training would fail)


class _Column:
    """A growable numpy column (capacity doubles): one row's value appended at a time, without a Python list."""

    def __init__(self, dtype, width: int | None = None):
        self.data = np.zeros((1024, width) if width else 1024, dtype=dtype)
        self.size = 0

    def append(self, value) -> None:
        if self.size == len(self.data):
            grown = np.zeros((len(self.data) * 2, *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.size] = self.data
            self.data = grown
        self.data[self.size] = value
        self.size += 1

    def values(self) -> np.ndarray:
        return self.data[: self.size]


def collect(facts: DataFacts, samples: int = 3, dedupe: bool = True) -> Report:
    """Read every row of `facts` once and build the report."""
    columns = {name: _Column(np.int64) for name in ("tokens", "trained", "kept", "trained_kept")}
    is_train, dropped, keys, signed = _Column(bool), _Column(bool), _Column(np.uint64), _Column(bool)
    signatures = _Column(np.uint16, duplicates.PERMUTATIONS)
    origins: list[str] = []
    labels = {split: Counter() for split in SPLITS}
    shown: list[dict] = []
    seen = Counter()
    for row in facts.rows:
        if row.split not in SPLITS:
            raise ValueError(f"row split {row.split!r} is not one of {SPLITS}")
        for name, column in columns.items():
            column.append(getattr(row, name))
        is_train.append(row.split == "train")
        dropped.append(row.dropped)
        origins.append(row.origin)
        labels[row.split].update(row.labels)
        text = row.text if dedupe else None
        key = row.key if row.key is not None else (duplicates.exact_key(text) if text is not None and text.strip() else 0)
        keys.append(key or 0)
        has_signature = bool(dedupe and text is not None and text.strip())
        signatures.append(duplicates.signature(text) if has_signature else 0)
        signed.append(has_signature)
        if seen[row.split] < samples and row.ids is not None:
            seen[row.split] += 1
            shown.append(_render(row, facts))
    values = {name: column.values() for name, column in columns.items()}
    return Report(facts, values, is_train.values(), dropped.values(), keys.values(), signatures.values(),
                  signed.values(), origins, labels, shown)


RENDERED = 1024  # tokens of a row rendered at most (a pretraining document may hold a book)


def _render(row: RowFacts, facts: DataFacts) -> dict:
    """The row as the model sees it: runs of tokens that are trained, context, or cut by max_length, decoded (the
    first `RENDERED` tokens)."""
    limit = facts.max_length if facts.max_length is not None else len(row.ids)
    row = RowFacts(**{**row.__dict__, "ids": row.ids[:RENDERED]})
    states = [
        "cut" if (i >= limit or row.dropped) else ("trained" if row.trained_mask and row.trained_mask[i] else "context")
        for i in range(len(row.ids))
    ]
    segments, start = [], 0
    for i in range(1, len(states) + 1):
        if i == len(states) or states[i] != states[start]:
            piece = row.ids[start:i]
            segments.append([facts.decode(piece) if facts.decode else " ".join(map(str, piece)), states[start]])
            start = i
    return {"split": row.split, "origin": row.origin, "labels": list(row.labels), "dropped": row.dropped, "segments": segments}


def _spread(values: np.ndarray) -> dict:
    if not len(values):
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0.0, "total": 0}
    return {
        "min": int(values.min()), "median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
        "max": int(values.max()), "mean": round(float(values.mean()), 2), "total": int(values.sum()),
    }


def _n(count: int, noun: str, verbs: str = "") -> str:
    """"1 row is" / "3 rows are": `count` `noun`s and the verb that agrees (`verbs` is "singular|plural")."""
    one, many = verbs.split("|") if verbs else ("", "")
    return f"{count:,} {noun}{'' if count == 1 else 's'} {one if count == 1 else many}".rstrip()


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0%"


class Report:
    """The figures of one data report (`summary`, JSON-ready) and the columns its histograms are drawn from."""

    def __init__(self, facts, values, is_train, dropped, keys, signatures, signed, origins, labels, shown):
        self.facts = facts
        self.values = values
        self.is_train = is_train
        self.dropped = dropped
        self.origins = origins
        self.summary = self._summarise(keys, signatures, signed, labels, shown)

    # ---------------------------------------------------------------------------------------------------------------
    # Figures
    # ---------------------------------------------------------------------------------------------------------------

    def _split(self, split: str) -> np.ndarray:
        return self.is_train if split == "train" else ~self.is_train

    def _summarise(self, keys, signatures, signed, labels, shown) -> dict:
        facts, limit = self.facts, self.facts.max_length
        splits = {}
        for split in SPLITS:
            mask = self._split(split)
            if not mask.any():
                continue
            v = {name: column[mask] for name, column in self.values.items()}
            kept = ~self.dropped[mask]
            splits[split] = {
                "rows": int(mask.sum()),
                "tokens": _spread(v["tokens"]),
                "prompt_tokens": _spread(v["tokens"] - v["trained"]) if facts.trains_on == "tokens" else None,
                "trained_tokens": _spread(v["trained"]) if facts.trains_on == "tokens" else None,
                "truncated_rows": int(((v["kept"] < v["tokens"]) & kept).sum()),
                "dropped_rows": int((~kept).sum()),
                "tokens_kept": int(v["kept"].sum()),
                "tokens_cut": int((v["tokens"] - v["kept"]).sum()),
                "trained_tokens_kept": int(v["trained_kept"].sum()),
                "trained_tokens_cut": int((v["trained"] - v["trained_kept"]).sum()),
            }
        found = duplicates.find_duplicates(keys, signatures, self.is_train, signed)
        summary = {
            "rows": len(self.origins),
            "max_length": limit,
            "trains_on": facts.trains_on,
            "skipped_rows": facts.tally.skipped,
            "problems": facts.tally.problems[:SHOWN],
            "splits": splits,
            "batching": self._batching(),
            "duplicates": self._duplicates(found),
            "leakage": self._leakage(found),
            "labels": self._labels(labels),
            "samples": shown,
        }
        summary["findings"] = self._findings(summary)
        summary["verdict"] = summary["findings"][0] if summary["findings"] else self._all_clear(summary)
        return summary

    def _batching(self) -> dict:
        """What training makes of the kept training rows: batches per epoch (one process), and padding or packing."""
        facts = self.facts
        kept = self.values["kept"][self.is_train & ~self.dropped]
        size, limit = facts.micro_batch_size, facts.max_length
        out = {"mode": facts.batching, "micro_batch_size": size}
        if facts.batching == "blocks":
            total = int(kept.sum())
            out.update(sequences=total // limit, tokens_left_over=total % limit)
            out["batches_per_epoch"] = math.ceil(out["sequences"] / size)
            return out
        if facts.batching == "packed":
            # TRL packs rows best-fit-decreasing into max_length sequences: at least this many, nearly full.
            out["sequences"] = math.ceil(int(kept.sum()) / limit) if limit else len(kept)
            out["batches_per_epoch"] = math.ceil(out["sequences"] / size)
            return out
        out["batches_per_epoch"] = math.ceil(len(kept) / size)
        if facts.batching == "padded" and len(kept):
            # Each batch is padded to its longest row; rows come in a random order (simulated with a fixed seed).
            order = np.random.default_rng(0).permutation(len(kept))
            shuffled = kept[order]
            starts = np.arange(0, len(shuffled), size)
            longest = np.maximum.reduceat(shuffled, starts)
            counts = np.diff(np.r_[starts, len(shuffled)])
            padded = int((longest * counts).sum())
            out["padding_share"] = round(1.0 - float(shuffled.sum()) / padded, 4) if padded else 0.0
        return out

    def _pairs(self, found, where: np.ndarray) -> dict:
        """Counts of the pairs whose row is in `where` (a mask over all rows), and the first `LISTED_PAIRS` named."""
        chosen = where[found.rows]
        rows, of, exact, similarity = found.rows[chosen], found.of[chosen], found.exact[chosen], found.similarity[chosen]
        listed = [
            {"row": self.origins[r], "repeats": self.origins[o], "kind": "exact" if e else "near", "similarity": float(s)}
            for r, o, e, s in zip(rows[:LISTED_PAIRS], of[:LISTED_PAIRS], exact[:LISTED_PAIRS], similarity[:LISTED_PAIRS])
        ]
        return {"rows": int(len(rows)), "exact": int(exact.sum()), "near": int((~exact).sum()), "pairs": listed}

    def _duplicates(self, found) -> dict:
        return {"threshold": duplicates.THRESHOLD, "shingle_words": duplicates.SHINGLE,
                "permutations": duplicates.PERMUTATIONS, **self._pairs(found, self.is_train)}

    def _leakage(self, found) -> dict:
        held = int((~self.is_train).sum())
        section = self._pairs(found, ~self.is_train)
        return {"eval_rows": held, **section, "fraction": round(section["rows"] / held, 4) if held else 0.0}

    def _labels(self, labels: dict) -> dict | None:
        if not any(labels.values()):
            return None
        train, held = labels["train"], labels["eval"]
        names = sorted(set(train) | set(held), key=str)
        return {
            "train": {str(k): train[k] for k in names if train[k]},
            "eval": {str(k): held[k] for k in names if held[k]},
            "only_in_train": [str(k) for k in names if train[k] and not held[k]] if held else [],
            "only_in_eval": [str(k) for k in names if held[k] and not train[k]],
        }

    def _findings(self, s: dict) -> list[str]:
        """What deserves a look, most consequential first, each with its figures."""
        facts, limit, out = self.facts, s["max_length"], []
        leak = s["leakage"]
        if leak["rows"]:
            out.append(
                f"{_n(leak['rows'], 'held-out row', 'also appears|also appear')} in training ({100 * leak['fraction']:.1f}%: "
                f"{leak['exact']:,} exact, {leak['near']:,} near): the held-out loss will flatter the model"
            )
        out += facts.notes
        labels = s["labels"]
        if labels and labels["only_in_eval"]:
            out.append(f"label(s) {', '.join(labels['only_in_eval'])} occur only in the held-out rows: the model has "
                       "no class for them (training stops on them)")
        tokens = facts.trains_on == "tokens"
        for split in SPLITS:
            info = s["splits"].get(split)
            if info is None:
                continue
            where = ("training" if split == "train" else "held-out") + " row"
            if info["dropped_rows"]:
                then = ("training stops on the first (data.on_bad_row: error)" if facts.drop_stops_training else
                        "training leaves them out")
                out.append(f"{_n(info['dropped_rows'], where, 'has|have')} nothing to learn within data.max_length="
                           f"{limit} ({_pct(info['dropped_rows'], info['rows'])} of the split): {then}")
            if info["truncated_rows"]:
                lost = info["trained_tokens_cut"] if tokens else info["tokens_cut"]
                whole = info["trained_tokens"]["total"] if tokens else info["tokens"]["total"]
                out.append(f"{_n(info['truncated_rows'], where, 'is|are')} longer than data.max_length={limit} "
                           f"({_pct(info['truncated_rows'], info['rows'])}): {lost:,} {'trained ' if tokens else ''}tokens "
                           f"({_pct(lost, whole)}) are cut")
        dup = s["duplicates"]
        if dup["rows"]:
            out.append(f"{_n(dup['rows'], 'training row', 'repeats|repeat')} another training row "
                       f"({_pct(dup['rows'], s['splits']['train']['rows'])}: {dup['exact']:,} exact, {dup['near']:,} near): "
                       "they weigh double")
        if labels and labels["train"]:
            counts = labels["train"]
            most, least = max(counts, key=counts.get), min(counts, key=counts.get)
            if counts[most] >= 10 * counts[least]:
                out.append(f"labels out of balance: '{most}' has {counts[most]:,} training rows, '{least}' "
                           f"{counts[least]:,} ({counts[most] / counts[least]:.0f}x); consider classification.class_weights")
        if labels and labels["only_in_train"]:
            out.append(f"label(s) {', '.join(labels['only_in_train'])} have no held-out rows: the held-out score says "
                       "nothing about them")
        if s["skipped_rows"]:
            out.append(f"{_n(s['skipped_rows'], 'unusable row', 'is|are')} skipped (data.on_bad_row: skip); "
                       f"first: {s['problems'][0]}")
        return out

    def _all_clear(self, s: dict) -> str:
        train = s["splits"].get("train", {})
        trained = train.get("trained_tokens") or {}
        what = f", {trained['total']:,} trained tokens" if trained else ""
        return f"OK: no leakage, no duplicates, nothing cut: {train.get('rows', 0):,} training rows{what}"

    @property
    def verdict(self) -> str:
        return self.summary["verdict"]

    def record(self) -> dict:
        """The figures `finetune train` keeps in train_metrics.json."""
        leak = self.summary["leakage"]
        return {
            "verdict": self.verdict,
            "leakage": {k: leak[k] for k in ("eval_rows", "rows", "exact", "near", "fraction")},
            "duplicates": self.summary["duplicates"]["rows"],
            "truncated_rows": {k: v["truncated_rows"] for k, v in self.summary["splits"].items()},
            "dropped_rows": {k: v["dropped_rows"] for k, v in self.summary["splits"].items()},
        }

    # ---------------------------------------------------------------------------------------------------------------
    # Files
    # ---------------------------------------------------------------------------------------------------------------

    def write(self, out: Path, title: str) -> list[Path]:
        """`data_report.md`, `.json`, `.html` and the PNGs in `out`: written in a folder beside it, then each file moved
        into place (a reader never sees half a file, and a failed write leaves the previous report whole)."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            images = self._plots(partial)
            summary = {"title": title, **self.summary, "histograms": images}
            (partial / "data_report.json").write_text(json.dumps(summary, indent=2) + "\n")
            (partial / "data_report.md").write_text(render_markdown(summary))
            (partial / "data_report.html").write_text(render_html(summary))
            out.mkdir(exist_ok=True)
            written = []
            for file in sorted(partial.iterdir()):
                file.replace(out / file.name)
                written.append(out / file.name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return written

    def _plots(self, folder: Path) -> list[str]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = []
        panels = [("tokens", "tokens per row")]
        if self.facts.trains_on == "tokens":
            panels.append(("trained", "trained tokens per row"))
        if self.summary["rows"] and self.facts.batching != "images":
            fig = Figure(figsize=(5.2 * len(panels), 3.4), layout="constrained")
            FigureCanvasAgg(fig)
            for index, (name, label) in enumerate(panels):
                ax = fig.add_subplot(1, len(panels), index + 1)
                column = self.values[name]
                top = max(int(column.max()), self.facts.max_length or 0, 1)
                bins = np.linspace(0, top, 41)
                for split in SPLITS:
                    mask = self._split(split)
                    if mask.any():
                        ax.hist(column[mask], bins=bins, alpha=0.6, label=f"{split} ({int(mask.sum()):,} rows)",
                                weights=np.full(int(mask.sum()), 1.0 / mask.sum()))
                # A pair's tokens are its prompt and both answers: max_length bounds each sequence, not their sum.
                if self.facts.max_length and self.facts.batching not in ("blocks", "pairs"):
                    ax.axvline(self.facts.max_length, color="crimson", linestyle="--", label=f"max_length {self.facts.max_length}")
                ax.set(xlabel=label, ylabel="share of the split's rows")
                ax.legend(fontsize=8)
                ax.grid(alpha=0.3)
            fig.savefig(folder / "lengths.png", dpi=90)
            names.append("lengths.png")
        labels = self.summary["labels"]
        if labels:
            names_ = sorted(set(labels["train"]) | set(labels["eval"]), key=str)
            fig = Figure(figsize=(max(4.0, 0.5 * len(names_) + 2), 3.4), layout="constrained")
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            x = np.arange(len(names_))
            for offset, split in ((-0.2, "train"), (0.2, "eval")):
                counts = labels[split]
                if counts:
                    ax.bar(x + offset, [counts.get(n, 0) for n in names_], width=0.4, label=split)
            tilt = len(names_) * max(len(n) for n in names_) > 40  # names that would run into each other
            ax.set_xticks(x, names_, rotation=30 if tilt else 0, ha="right" if tilt else "center")
            ax.set(ylabel="rows", title="labels per split")
            ax.legend(fontsize=8)
            fig.savefig(folder / "labels.png", dpi=90)
            names.append("labels.png")
        return names


# -------------------------------------------------------------------------------------------------------------------
# Rendering
# -------------------------------------------------------------------------------------------------------------------

MARKS = {"trained": ("[[", "]]"), "context": ("", ""), "cut": ("<<cut: ", ">>")}


def plain_sample(sample: dict) -> str:
    """A rendered row for the terminal: trained tokens between [[ and ]], what max_length cuts in <<cut: ...>>."""
    return "".join(f"{MARKS[state][0]}{text}{MARKS[state][1]}" for text, state in sample["segments"])


def _split_rows(summary: dict) -> list[tuple[str, ...]]:
    rows = []
    for split, info in summary["splits"].items():
        tokens, trained = info["tokens"], info["trained_tokens"]
        rows.append((
            split, f"{info['rows']:,}", f"{tokens['median']:g} / {tokens['p95']:g} / {tokens['max']:,}",
            f"{trained['median']:g} / {trained['total']:,}" if trained else "-",
            f"{info['truncated_rows']:,}", f"{info['dropped_rows']:,}",
            f"{info['trained_tokens_cut']:,}" if trained else f"{info['tokens_cut']:,}",
        ))
    return rows


SPLIT_HEADER = ("split", "rows", "tokens median / p95 / max", "trained median / total", "rows cut", "rows dropped",
                "trained tokens cut")
LABEL_SPLIT_HEADER = SPLIT_HEADER[:-1] + ("tokens cut",)  # a classifier trains on its label: every token is read


def _row_counts(s: dict) -> str:
    return ", ".join(f"{split} {info['rows']:,} rows" for split, info in s["splits"].items())


def _has_tokens(s: dict) -> bool:
    return s["batching"]["mode"] != "images"


def _header(s: dict) -> tuple[str, ...]:
    return SPLIT_HEADER if s["trains_on"] == "tokens" else LABEL_SPLIT_HEADER


def _sample_title(s: dict, sample: dict) -> str:
    label = f", label {', '.join(sample['labels'])}" if sample["labels"] else ""
    return f"{sample['split']}, {sample['origin']}{label}"


def _legend(s: dict, trained: str, cut: str) -> str:
    if s["trains_on"] == "tokens":
        return f"trained tokens {trained}; what data.max_length cuts {cut}"
    return f"what the classifier reads; what data.max_length cuts {cut}"


def _batching_line(b: dict) -> str:
    line = f"{b['mode'].replace('_', '-')}: {b['batches_per_epoch']:,} batches of {b['micro_batch_size']} per epoch (one process)"
    if "padding_share" in b:
        line += f"; {100 * b['padding_share']:.1f}% of the padded batch tokens are padding"
    if b["mode"] == "packed":
        line += f"; at least {b['sequences']:,} packed sequences"
    if b["mode"] == "blocks":
        line += f"; {b['sequences']:,} blocks, {b['tokens_left_over']:,} tokens left over"
    if b["mode"] == "pairs":
        line += "; each pair's chosen and rejected sequences padded to the batch's longest"
    return line


def render_text(s: dict, samples: int = 2) -> str:
    """The report for the terminal: verdict, findings, lengths, duplicates and leakage, the first rows rendered."""
    lines = [f"Verdict: {s['verdict']}"] + [f"  - {f}" for f in s["findings"][1:]]
    rows = [_header(s), *_split_rows(s)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SPLIT_HEADER))]
    if _has_tokens(s):
        lines += [""] + ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"  max_length {s['max_length']}; {_batching_line(s['batching'])}"]
    else:
        lines += ["", f"  {_row_counts(s)}; {_batching_line(s['batching'])}"]
    dup, leak = s["duplicates"], s["leakage"]
    lines += [f"  duplicates in training: {dup['rows']:,} ({dup['exact']:,} exact, {dup['near']:,} near); held-out rows "
              f"repeating training rows: {leak['rows']:,} of {leak['eval_rows']:,}"]
    lines += [f"    {p['row']} repeats {p['repeats']} ({p['kind']}, {p['similarity']:.2f})" for p in leak["pairs"][:5]]
    labels = s["labels"]
    if labels:
        names = sorted(set(labels["train"]) | set(labels["eval"]), key=str)
        lines += ["  labels (train/eval): " + ", ".join(f"{n} {labels['train'].get(n, 0)}/{labels['eval'].get(n, 0)}" for n in names)]
    for sample in s["samples"][:samples]:
        lines += ["", f"{_sample_title(s, sample)} ({_legend(s, 'in [[ ]]', 'in <<cut: >>')}):", plain_sample(sample)]
    return "\n".join(lines)


def render_markdown(s: dict) -> str:
    lines = [f"# Data report: {s['title']}", "", f"**Verdict:** {s['verdict']}", ""]
    if s["findings"]:
        lines += [f"- {f}" for f in s["findings"]] + [""]
    if _has_tokens(s):
        lines += ["## Lengths", "", "| " + " | ".join(_header(s)) + " |", "|" + " --- |" * len(SPLIT_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in _split_rows(s)]
        lines += ["", f"max_length: {s['max_length']}. Batches: {_batching_line(s['batching'])}.", ""]
    else:
        lines += ["## Rows", "", f"{_row_counts(s)}. Batches: {_batching_line(s['batching'])}.", ""]
    lines += [f"![{name}]({name})" for name in s.get("histograms", [])] + [""]
    dup, leak = s["duplicates"], s["leakage"]
    lines += [
        "## Duplicates and leakage", "",
        f"Exact: same text after case and whitespace are normalised. Near: MinHash over {dup['shingle_words']}-word "
        f"shingles, estimated Jaccard similarity >= {dup['threshold']}.", "",
        f"- within training: {dup['rows']:,} rows ({dup['exact']:,} exact, {dup['near']:,} near)",
        f"- held-out rows that repeat training rows: {leak['rows']:,} of {leak['eval_rows']:,} ({leak['exact']:,} exact, "
        f"{leak['near']:,} near)", "",
    ]
    for name, pairs in (("Leakage", leak["pairs"]), ("Duplicates in training", dup["pairs"])):
        if pairs:
            lines += [f"{name} (first {min(SHOWN, len(pairs))}):", "", "| row | repeats | kind | similarity |", "| --- | --- | --- | --- |"]
            lines += [f"| {p['row']} | {p['repeats']} | {p['kind']} | {p['similarity']:.2f} |" for p in pairs[:SHOWN]] + [""]
    labels = s["labels"]
    if labels:
        lines += ["## Labels", "", "| label | train | eval |", "| --- | --- | --- |"]
        for name in sorted(set(labels["train"]) | set(labels["eval"]), key=str):
            lines.append(f"| {name} | {labels['train'].get(name, 0):,} | {labels['eval'].get(name, 0):,} |")
        lines.append("")
    if s["samples"]:
        lines += ["## The first rows as the model sees them", "", _legend(s, "between `[[` and `]]`", "in `<<cut: ...>>`") + ".", ""]
        for sample in s["samples"]:
            lines += [f"**{_sample_title(s, sample)}**:", "", "```", plain_sample(sample), "```", ""]
    if s["problems"]:
        lines += ["## Unusable rows", ""] + [f"- {p}" for p in s["problems"]] + [""]
    return "\n".join(lines)


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
.verdict{padding:.8rem 1rem;border-radius:6px;background:#fff3cd}.ok{background:#d1e7dd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
pre{white-space:pre-wrap;background:#f6f8fa;padding:.6rem;border-radius:6px}
.trained{background:#c8f7c5}.context{color:#555}.cut{color:#a00;text-decoration:line-through}
"""


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(s: dict) -> str:
    e = html.escape
    ok = " ok" if not s["findings"] else ""
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>Data report: {e(s['title'])}</title>",
        f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>Data report: {e(s['title'])}</h1>",
        f'<p class="verdict{ok}"><strong>Verdict:</strong> {e(s["verdict"])}</p>',
    ]
    if s["findings"]:
        parts.append("<ul>" + "".join(f"<li>{e(f)}</li>" for f in s["findings"]) + "</ul>")
    if _has_tokens(s):
        parts += ["<h2>Lengths</h2>", _table(_header(s), _split_rows(s)),
                  f"<p>max_length: {e(str(s['max_length']))}. Batches: {e(_batching_line(s['batching']))}.</p>"]
    else:
        parts += ["<h2>Rows</h2>", f"<p>{e(_row_counts(s))}. Batches: {e(_batching_line(s['batching']))}.</p>"]
    parts += [f'<p><img src="{e(name)}" alt="{e(name)}"></p>' for name in s.get("histograms", [])]
    dup, leak = s["duplicates"], s["leakage"]
    parts += [
        "<h2>Duplicates and leakage</h2>",
        f"<p>Within training: {dup['rows']:,} rows ({dup['exact']:,} exact, {dup['near']:,} near). Held-out rows that "
        f"repeat training rows: {leak['rows']:,} of {leak['eval_rows']:,}. Near: MinHash over {dup['shingle_words']}-word "
        f"shingles, similarity &ge; {dup['threshold']}.</p>",
    ]
    for name, pairs in (("Leakage", leak["pairs"]), ("Duplicates in training", dup["pairs"])):
        if pairs:
            parts += [f"<h3>{name}</h3>", _table(("row", "repeats", "kind", "similarity"),
                                                 [(p["row"], p["repeats"], p["kind"], f"{p['similarity']:.2f}") for p in pairs[:SHOWN]])]
    labels = s["labels"]
    if labels:
        names = sorted(set(labels["train"]) | set(labels["eval"]), key=str)
        parts += ["<h2>Labels</h2>", _table(("label", "train", "eval"),
                                            [(n, labels["train"].get(n, 0), labels["eval"].get(n, 0)) for n in names])]
    if s["samples"]:
        parts += ["<h2>The first rows as the model sees them</h2>",
                  ('<p><span class="trained">trained tokens</span>, <span class="context">context</span>, '
                   if s["trains_on"] == "tokens" else '<p><span class="context">what the classifier reads</span>, ')
                  + '<span class="cut">cut by max_length</span></p>']
        for sample in s["samples"]:
            spans = "".join(f'<span class="{state}">{e(text)}</span>' for text, state in sample["segments"])
            parts += [f"<h3>{e(_sample_title(s, sample))}</h3>", f"<pre>{spans}</pre>"]
    if s["problems"]:
        parts += ["<h2>Unusable rows</h2>", "<ul>" + "".join(f"<li>{e(p)}</li>" for p in s["problems"]) + "</ul>"]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------------------------
# Held-out split and the cached record for `finetune train`
# -------------------------------------------------------------------------------------------------------------------


# Past this much data, training does not read it a second time for the report (the main process would keep the
# others waiting, and 1M chat rows take half an hour here): `finetune data` reports it once, training reuses that.
TRAIN_REPORT_MAX_BYTES = 64 * 2**20


def run_record(recipe, facts: Callable[[], DataFacts], tokenizer) -> dict:
    """The figures `finetune train` prints and keeps (`Report.record`): from the cache when `finetune data` (or an
    earlier run) reported on the same files, recipe and tokenizer; else read now, without the rendered rows, when
    the data is small enough; else a verdict that says how to get the report."""
    key = _key(recipe, tokenizer)
    size = _data_bytes(recipe)
    if size > TRAIN_REPORT_MAX_BYTES and not (key and (_records() / f"{key}.json").is_file()):
        return {
            "verdict": f"not read while training ({size / 2**20:.0f} MiB of data): `finetune data` reports it once, "
            "and training then prints its verdict",
            "computed": False,
        }
    return cached_record(_records(), key, lambda: collect(facts(), samples=0))


def _data_bytes(recipe) -> int:
    """The size of the recipe's local data files and folders (hub datasets count nothing)."""
    total = 0
    for source in [*recipe.data.train, *(recipe.data.eval or [])]:
        try:
            path = local_path(source) if is_local(source) else None
        except FinetuneError:
            continue
        if path is not None and path.is_file():
            total += path.stat().st_size
        elif path is not None and path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def save_record(recipe, tokenizer, report: Report) -> None:
    """Keep `report`'s figures for the next `finetune train` of the same data."""
    cached_record(_records(), _key(recipe, tokenizer), lambda: report)


def _records() -> Path:
    from finetune.paths import cache_dir

    return cache_dir() / "data_reports"


def _key(recipe, tokenizer) -> str | None:
    from finetune.data.cache import tokenizer_fingerprint

    return record_key(recipe, tokenizer_fingerprint(tokenizer) if tokenizer is not None else None)


def record_key(recipe, tokenizer_key: str | None) -> str | None:
    """What a report's figures depend on: every data file's bytes, the recipe's task, model, data and task sections
    and micro-batch size, the tokenizer and this code. None when a source is not a local file (a hub dataset, a folder)."""
    digests = []
    for source in [*recipe.data.train, *(recipe.data.eval or [])]:
        try:
            path = local_path(source) if is_local(source) else None
        except FinetuneError:  # a package that is not installed: reading the rows says so
            return None
        if path is None or not path.is_file():
            return None
        digests.append(file_digest(path))
    # The sections that shape rows, tokens and batches; not the optimizer, adapter, outputs or evaluation.
    options = recipe.model_dump(mode="json", include={"task", "model", "data", "classification", "image", "pretrain"})
    options["micro_batch_size"] = recipe.train.micro_batch_size
    code = code_digest(*sorted(Path(__file__).parent.glob("*.py")))  # all of data/: reading, templating, masking
    return fingerprint("data-report", code, options, digests, tokenizer_key)


def cached_record(folder: Path, key: str | None, build: Callable[[], Report]) -> dict:
    """`Report.record()` from the cache under `key`, or built now and cached."""
    entry = folder / f"{key}.json" if key else None
    found = read_json(entry, lambda v: isinstance(v, dict) and "verdict" in v) if entry is not None else None
    if found is None:
        found = build().record()
        if entry is not None:
            write_json(entry, found)
    return found
