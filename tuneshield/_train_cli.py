"""``tuneshield train``: LoRA SFT + DPO on a samples file, with progress bars."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from tuneshield._console import stage_bars, user_errors

STAGE_LABELS = {"sft": "SFT (LoRA)", "dpo": "DPO"}


def _summary(manifest: dict[str, Any], adapter_dir: Path) -> Table:
    data = manifest["data"]
    table = Table(title=f"adapter: {adapter_dir}", title_justify="left")
    for column in ("stage", "rows", "steps", "final loss", "seconds", "s/step", "peak RSS MB"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, metrics in manifest["stages"].items():
        if "skipped" in metrics:
            table.add_row(STAGE_LABELS[stage], f"skipped: {metrics['skipped']}")
            continue
        loss = metrics["final_loss"]
        table.add_row(
            STAGE_LABELS[stage],
            str(metrics["rows"]),
            str(metrics["steps"]),
            "-" if loss is None else f"{loss:.4f}",
            f"{metrics['duration_s']:.1f}",
            "-" if metrics["seconds_per_step"] is None else f"{metrics['seconds_per_step']:.2f}",
            f"{metrics['peak_rss_mb']:.0f}",
        )
    table.caption = (
        f"{data['samples']} samples, {data['flagged']} flagged, {data['dpo_pairs']} DPO pairs; "
        f"base {manifest['base_model']}; manifest.json in the adapter folder"
    )
    return table


def train(
    samples_file: Path = typer.Argument(..., help="Samples (.jsonl or .parquet), healed or not."),
    base: str = typer.Option("default", help="Base model: HF id, local folder or 'default'."),
    out: Path = typer.Option(..., help="Adapter folder to create (must not exist)."),
    no_dpo: bool = typer.Option(False, "--no-dpo", help="SFT only (ablation)."),
    init_adapter: Path | None = typer.Option(None, help="Continue training this LoRA adapter."),
    epochs: float | None = typer.Option(None, help="SFT epochs (default: policies)."),
    dpo_epochs: float | None = typer.Option(None, help="DPO epochs (default: policies)."),
    max_steps: int | None = typer.Option(None, help="Cap each stage at this many steps."),
    seed: int | None = typer.Option(None, help="Seed (default: policies)."),
) -> None:
    """LoRA SFT on every sample, then DPO on the flagged ones (healing reply preferred)."""
    from tuneshield._samples import read_samples
    from tuneshield._train import load_train_config, override_stage, train_adapter

    with user_errors():
        config = load_train_config()
        config = override_stage(config, "sft", num_train_epochs=epochs, max_steps=max_steps)
        config = override_stage(config, "dpo", num_train_epochs=dpo_epochs, max_steps=max_steps)
        if seed is not None:
            config = dataclasses.replace(config, seed=seed)
        samples = read_samples(samples_file)
        with stage_bars(STAGE_LABELS) as progress:
            result = train_adapter(
                base,
                samples,
                out,
                config,
                dpo=not no_dpo,
                init_adapter=init_adapter,
                progress=progress,
            )
    Console().print(_summary(result.manifest, result.adapter_dir))
