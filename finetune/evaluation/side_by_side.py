"""`finetune eval`, in order: what was given → which variants → checks and held-out rows (before any model load)
→ load the base once → per variant: held-out loss, generations or classification, lm_eval tasks → compare the
variants' logits → write the report into a temporary folder, then move it into place."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.checks import new_tokens_problem
from finetune.errors import DataError, FinetuneError
from finetune.evaluation.source import EvalSource, resolve_source
from finetune.evaluation.variants import choose_variants, load_variants
from finetune.recipe import DataSource

log = logging.getLogger("finetune")

# Logits of two variants closer than this (relative to the logit scale) count as equal: the adapter did nothing.
SAME_LOGITS = 1e-6
# Scored positions whose logits are kept to compare variants (positions x vocabulary floats, per variant).
COMPARED_POSITIONS = 256


@dataclass
class EvalOptions:
    """What `finetune eval` was asked; None means the recipe's `eval` section decides, else the built-in default."""

    variants: list[str] | None = None
    data: str | None = None
    tasks: list[str] | None = None
    limit: int | None = None
    out: str | None = None
    merged: str | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None


@dataclass
class Evaluation:
    """Everything measured, per variant; `finetune.evaluation.report` writes it out."""

    source: EvalSource
    variants: list[str]
    data_name: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> metric -> value
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> metric -> standard error, if known
    lower_is_better: set[str] = field(default_factory=set)
    predictions: list[dict] = field(default_factory=list)
    tasks: dict = field(default_factory=dict)  # lm_eval task -> variant -> result
    comparisons: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)  # rows, scored tokens, limits


def evaluate_run(target: str | Path, options: EvalOptions | None = None) -> tuple[Evaluation, Path]:
    """Compare base, adapter and merged model of a finished run; write `eval/` (or `options.out`); return both."""
    from finetune.evaluation.report import output_folder, write_report
    from finetune.runtime import apply_threads, resolve_runtime

    options = options or EvalOptions()
    started = time.perf_counter()
    source = resolve_source(target, options.merged)
    recipe, settings = source.recipe, source.recipe.eval
    names, notes = choose_variants(source, options.variants or settings.variants)
    if source.scoring == "pairs" and source.has_adapter and recipe.preference.from_run and "base" in names:
        # The preference run's reference, the SFT model it started from, beside the base and the tuned model.
        if not Path(recipe.preference.from_run).is_dir():
            raise FinetuneError(f"preference.from_run: {recipe.preference.from_run} (the SFT run this run started "
                                "from, its reference) is gone; evaluate with --variants adapter,base.")
        names.insert(names.index("base") + 1, "start")
    tasks = _tasks(source, options.tasks if options.tasks is not None else settings.tasks)
    limit = options.limit if options.limit is not None else settings.limit
    out = output_folder(source, options.out)
    runtime = resolve_runtime(recipe)
    apply_threads(runtime)

    # Everything that can fail without a model fails here: the data rows, the task names, the generation length.
    if options.max_new_tokens is not None:
        problem = new_tokens_problem(recipe, options.max_new_tokens, "--max-new-tokens")
        if problem:
            raise FinetuneError(problem)
    tokenizer = _tokenizer(source)
    pairs = None
    if source.scoring == "pairs":
        pairs, rows, data_name = held_out_pairs(source, options.data, tokenizer, limit)
    else:
        rows, data_name = held_out_rows(source, options.data, tokenizer, limit)
    evaluation = Evaluation(source, names, data_name, notes=notes)
    evaluation.facts.update(rows=len(rows), limit=limit, tasks=tasks, device=runtime.device, precision=runtime.precision)
    evaluation.seconds["checks"] = time.perf_counter() - started

    clock = time.perf_counter()
    variants = load_variants(source, names, runtime, tokenizer)
    evaluation.seconds["load"] = time.perf_counter() - clock
    evaluation.notes += variants.notes
    if "merged" in names:
        evaluation.facts["merged_from"] = variants.merged_from
    batch_size = options.batch_size or settings.batch_size
    if source.scoring == "classifier":
        _evaluate_classifier(evaluation, variants, rows, batch_size)
    else:
        _evaluate_language_model(evaluation, variants, rows, tasks, {
            "batch_size": batch_size, "max_new_tokens": options.max_new_tokens or settings.max_new_tokens,
            "max_length": recipe.data.max_length, "limit": limit, "seed": recipe.train.seed,
        })
    if pairs is not None:
        _evaluate_pairs(evaluation, variants, pairs, recipe.preference.beta, batch_size)
    evaluation.seconds["total"] = time.perf_counter() - started
    write_report(evaluation, out)
    return evaluation, out


def check_eval_settings(recipe) -> None:
    """The lm_eval tasks `eval.tasks` names, and for `eval.after_training` what would stop the evaluation: found by
    `finetune validate` and before training instead of after it."""
    source = EvalSource(recipe, run_dir=None, merged_dir=None, has_adapter=recipe.adapter.type != "none")
    if recipe.eval.tasks:
        _tasks(source, recipe.eval.tasks)
    if not recipe.eval.after_training:
        return
    if recipe.eval.variants and "merged" in recipe.eval.variants and recipe.is_quantized:
        raise FinetuneError(
            "eval.variants: merged, with eval.after_training, on a quantized base: the merged model needs "
            "`finetune merge` first; leave merged out here and run `finetune eval RUN_DIR --merged DIR` after merging."
        )
    _tasks(source, recipe.eval.tasks)
    if not (recipe.data.eval or recipe.data.eval_fraction):
        raise FinetuneError("eval.after_training needs held-out rows: set data.eval or data.eval_fraction.")


def _tasks(source: EvalSource, requested: list[str] | None) -> list[str]:
    """lm_eval task names, checked now; None means the shipped local tasks for a causal LM."""
    if requested == []:
        return []
    if source.scoring == "classifier":
        if requested:
            raise FinetuneError(
                f"--tasks {','.join(requested)}: lm_eval tasks score a causal LM; this is a classification run, "
                "whose held-out classification report is always computed."
            )
        return []
    from finetune.evaluation import harness

    names = list(harness.local_tasks()) if requested is None else requested
    harness.check_tasks(names)
    return names


def _tokenizer(source: EvalSource):
    """The run's tokenizer (its chat template), loaded as training loads one (pad token, remote-code setting)."""
    from finetune.models.loading import load_tokenizer, resolve_model_path

    return load_tokenizer(source.recipe, str(source.tokenizer_dir or resolve_model_path(source.recipe.model)))


def _held_out_sources(recipe, data: str | None) -> tuple[list[DataSource], str, bool]:
    """Where the held-out rows come from: `--data`, else `data.eval`, else `data.train` to split by
    `data.eval_fraction`; with the name the report gives them and whether the split is still to make."""
    if data is not None:
        return [DataSource(path=data)], data, False
    if recipe.data.eval:
        return recipe.data.eval, ", ".join(s.path for s in recipe.data.eval), False
    if recipe.data.eval_fraction:
        name = f"{recipe.data.eval_fraction:g} of {', '.join(s.path for s in recipe.data.train)} (seed {recipe.data.seed})"
        return recipe.data.train, name, True
    raise DataError("no held-out data: the recipe has no data.eval or data.eval_fraction; give --data FILE.")


def held_out_rows(source: EvalSource, data: str | None, tokenizer, limit: int | None) -> tuple[list[dict], str]:
    """The rows to score: `--data`, else the recipe's `data.eval`, else its seeded `data.eval_fraction` split of
    `data.train` (the rows training held out), read and checked as training reads them."""
    from finetune.data.rows import split_rows

    recipe = source.recipe
    sources, name, split = _held_out_sources(recipe, data)
    if source.scoring == "classifier":
        from finetune.data.classification import check_labels, load_classification_rows

        rows = load_classification_rows(sources, recipe).rows
    else:
        from finetune.data.sft import load_rows

        rows = load_rows(sources, recipe.data, chat=bool(tokenizer.chat_template)).rows
    if split:
        rows = split_rows(rows, recipe.data.eval_fraction, recipe.data.seed)[1]
    if source.scoring == "classifier":
        from finetune.data.classification import LabelMap

        check_labels(rows, LabelMap.load(source.run_dir))
    return (rows[:limit] if limit else rows), name


def held_out_pairs(source: EvalSource, data: str | None, tokenizer, limit: int | None):
    """A preference run's held-out pairs, tokenized as training tokenized them, and the same rows as SFT rows (the
    prompt and its chosen answer) for the held-out loss and the generations."""
    from finetune.data.preference import load_preference_rows, tokenize_preference_rows
    from finetune.data.rows import split_rows

    recipe = source.recipe
    sources, name, split = _held_out_sources(recipe, data)
    rows, tokens = tokenize_preference_rows(load_preference_rows(sources, recipe.data), tokenizer, recipe.data)
    if "chosen" not in rows.rows[0]:
        raise DataError(f"{name}: pair accuracy needs pairs (prompt, chosen, rejected); these rows are unpaired.")
    pairs = list(zip(rows.rows, tokens))
    if split:
        pairs = split_rows(pairs, recipe.data.eval_fraction, recipe.data.seed)[1]
    pairs = pairs[:limit] if limit else pairs
    sft_rows = [
        {"messages": [*row["prompt"], {"role": "assistant", "content": row["chosen"]}]} if isinstance(row["prompt"], list)
        else {"prompt": row["prompt"], "completion": row["chosen"]}
        for row, _ in pairs
    ]
    return [t for _, t in pairs], sft_rows, name


def _evaluate_pairs(evaluation, variants, pairs: list[dict], beta: float, batch_size: int) -> None:
    """Each variant's log-probabilities of the held-out answers: how often it finds the chosen answer the likelier,
    and against the reference (the SFT start, else the base) DPO's implicit reward: pair accuracy and mean margin."""
    from finetune.evaluation.preference import pair_scores

    scores = {}
    for name in variants.names:
        with variants.use(name) as model, _timed(evaluation, name, "pairs"):
            scores[name] = pair_scores(model, pairs, batch_size)
    reference = "start" if "start" in scores else "base" if "base" in scores else None
    for name, score in scores.items():
        metrics = evaluation.metrics.setdefault(name, {})
        metrics["pairs/likelihood_accuracy"] = score.likelihood_accuracy
        if reference is not None:
            against = score.against(scores[reference], beta)
            metrics["pairs/reward_accuracy"] = against["pair_accuracy"]
            metrics["pairs/mean_margin"] = against["mean_margin"]
    evaluation.facts.update(pairs=len(pairs), pair_reference=reference, beta=beta)
    if reference is not None:
        evaluation.notes.append(
            f"pairs/reward_accuracy and pairs/mean_margin: DPO's implicit reward beta * (log p(answer) - log "
            f"p_ref(answer)), chosen minus rejected, over {len(pairs)} held-out pairs (beta {beta}), the reference "
            f"being the {'SFT start' if reference == 'start' else 'base'}, which scores 0 by definition. pairs/likelihood_accuracy: how often the chosen answer is the likelier."
        )


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="row", leave=False, disable=None)


def _timed(evaluation: Evaluation, variant: str, part: str):
    """A context that adds its wall time to `seconds[variant][part]`."""
    from contextlib import contextmanager

    @contextmanager
    def clock():
        start = time.perf_counter()
        try:
            yield
        finally:
            evaluation.seconds.setdefault(variant, {})[part] = round(time.perf_counter() - start, 2)

    return clock()


def _evaluate_language_model(evaluation, variants, rows, tasks, options: dict) -> None:
    """Per variant, everything while it is set up (an in-memory merge is done once): held-out loss, answers,
    lm_eval tasks."""
    from finetune.evaluation.language import generate, held_out_loss, loss_examples, prompted_rows
    from finetune.metrics.text import row_scores, score_generations

    tokenizer, batch_size = variants.tokenizer, options["batch_size"]
    examples = loss_examples(rows, tokenizer, options["max_length"])
    prompts = prompted_rows(rows, tokenizer)
    evaluation.facts.update(scored_rows=len(examples), generated_rows=len(prompts), max_new_tokens=options["max_new_tokens"])
    evaluation.lower_is_better |= {"held_out/loss", "held_out/perplexity"}
    logits, answers = {}, {}
    for name in variants.names:
        metrics = evaluation.metrics.setdefault(name, {})
        with variants.use(name) as model:
            if examples:
                with _timed(evaluation, name, "held_out_loss"), _progress(len(examples), f"{name}: loss") as bar:
                    result = held_out_loss(model, examples, tokenizer.pad_token_id, batch_size, COMPARED_POSITIONS, bar)
                metrics["held_out/loss"], metrics["held_out/perplexity"] = result["loss"], result["perplexity"]
                evaluation.facts["scored_tokens"] = result["tokens"]
                logits[name] = result["logits"]
            if prompts:
                with _timed(evaluation, name, "generation"), _progress(len(prompts), f"{name}: generate") as bar:
                    answers[name] = generate(model, tokenizer, prompts, options["max_new_tokens"], batch_size, progress=bar)
                scores = score_generations(answers[name], [p.reference for p in prompts])
                metrics.update({f"generation/{k}": v for k, v in scores.items()})
            if tasks:
                _run_tasks(evaluation, name, model, tokenizer, tasks, options)
        _say(evaluation, name)
    for i, p in enumerate(prompts):
        evaluation.predictions.append({
            "prompt": p.prompt, "reference": p.reference,
            **{name: {"answer": answers[name][i], **row_scores(answers[name][i], p.reference)} for name in answers},
        })
    _compare_logits(evaluation, logits, "scored token positions")


def _run_tasks(evaluation, name, model, tokenizer, tasks, options: dict) -> None:
    from finetune.evaluation import harness

    results = harness.run_tasks(model, tokenizer, tasks, options["limit"], batch_size=options["batch_size"], seed=options["seed"])
    for task, result in results.items():
        evaluation.tasks.setdefault(task, {})[name] = result
        evaluation.seconds.setdefault(name, {})[task] = round(result.get("seconds", 0.0), 2)
        for metric, value in result["metrics"].items():
            evaluation.metrics.setdefault(name, {})[f"{task}/{metric}"] = value
        for metric, value in (result.get("stderr") or {}).items():
            evaluation.stderr.setdefault(name, {})[f"{task}/{metric}"] = value


def _evaluate_classifier(evaluation, variants, rows, batch_size) -> None:
    from finetune.evaluation.classification import classify, table_metrics

    classifier = variants.extra["classifier"]
    logits, predicted, reports = {}, {}, {}
    for name in variants.names:
        with variants.use(name) as model, _timed(evaluation, name, "classification"):
            reports[name], logits[name], predicted[name] = classify(classifier, model, rows, batch_size)
        evaluation.metrics[name] = table_metrics(reports[name])
        _say(evaluation, name)
    evaluation.facts["reports"] = reports
    if "base" in reports:
        evaluation.notes.append(
            "base: the pretrained model with the new classification head as training initialised it (same seed), so "
            "its scores are chance level and equal the evaluation before training's first step."
        )
    for i, row in enumerate(rows):
        evaluation.predictions.append({
            "text": row["text"], "label": row["labels"] if len(row["labels"]) != 1 else row["labels"][0],
            **{name: predicted[name][i] for name in predicted},
        })
    _compare_logits(evaluation, logits, "rows")


def _say(evaluation: Evaluation, name: str) -> None:
    spent = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in evaluation.seconds.get(name, {}).items())
    log.info("%s done (%s)", name, spent)


def _compare_logits(evaluation: Evaluation, logits: dict, unit: str) -> None:
    """Largest logit differences adapter vs merged (the merge is faithful) and adapter vs base (the adapter acts)."""
    if "adapter" not in logits or logits["adapter"] is None:
        return
    adapter = logits["adapter"]
    scale = max(1.0, float(adapter.abs().max()))
    for other in ("merged", "base"):
        if logits.get(other) is None:
            continue
        diff = float((adapter - logits[other]).abs().max())
        evaluation.comparisons[f"adapter_vs_{other}_max_abs_logit_diff"] = diff
        if other == "base" and diff <= SAME_LOGITS * scale:
            evaluation.warnings.append(
                f"THE ADAPTER CHANGED NOTHING: its logits equal the base model's on every compared position (largest "
                f"difference {diff:.2g}). The adapter's weights are zero or were never applied: check that training "
                "ran (train_metrics.json), that the learning rate is not 0, and adapter.target_modules."
            )
    evaluation.comparisons["compared"] = f"{int(adapter.shape[0])} {unit}"
    evaluation.comparisons["adapter_max_abs_logit"] = scale
