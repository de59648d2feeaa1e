"""A learning round's training on a GPU machine: time, memory, FLOP/s, bf16/fp32 parity.

Two steps, on two machines::

    # here (the project's venv, CPU): the model's files and a 1,000-dialog round's samples
    .venv/bin/python benchmarks/gpu_round.py prepare [--dialogs 1000] [--out .gpu_model]

    # there (python3 with torch; trl, datasets, ... as carried wheels): the round
    python3 benchmarks/gpu_round.py run [--data .gpu_model] [--out $OUT] [--budget-s 330]
        [--tiny] [--max-dialogs N] [--parity-steps 40]

``prepare`` runs what a round runs before training, on CPU: the benchmark's simulated
users (benchmarks/round.py ``plan_dialogs``: chit-chat dialogs, 30% attackers, injection)
logged as the gateway logs turns, turned into samples as the worker reads a snapshot,
classified by the round's defense judge and healed contextually by SmolLM2
(``policies/learner.yaml`` ``round``). It writes ``samples.jsonl`` (the round's file of that
name) and SmolLM2-135M-Instruct's config and tokenizer (a few MB: its weights are over the
size that travels) into ``--out``.

``run`` imports the training path only (``tuneshield`` and TRL; no gateway, store, engine,
so no duckdb, litestar, msgspec or vLLM) and, on SmolLM2-135M's architecture and tokenizer
with random weights (time, memory and FLOPs do not depend on the weights):

1. measures the device's dense matmul peak in bf16 and fp32 (``measure_matmul_peak``);
2. trains the round's candidate as the worker does (``train_adapter``: SFT on all samples,
   DPO on the flagged ones, the policy's epochs, no step cap, ``bf16: auto``), and reports
   per stage the seconds, tokens/s, padding, peak GPU memory and the achieved FLOP/s as a
   share of the peak;
3. verifies the adapter (``verify_adapter``) and loads it into a served PEFT model by name
   (the in-process analogue of vLLM's ``/v1/load_lora_adapter``; vLLM is not there);
4. trains ``--parity-steps`` SFT steps and half as many DPO steps twice from the same seed
   on the same data, in bf16 and in fp32, and compares the per-step losses. On random
   weights the losses are those of an untrained model (SFT from ~ln(vocabulary), DPO from
   ln 2): the comparison shows whether bf16 follows the fp32 trajectory, not the quality;
5. trains the undefended round's SFT (the same samples unhealed, no DPO), budget allowing.

Each step's failure is caught and reported; the others still run. Results go to ``--out``
(default ``$OUT``): ``gpu_round.json`` and ``gpu_round.md``, rewritten after every step, so
a run cut short still leaves what it measured. Optional steps (4, 5) are skipped when the
time left in ``--budget-s`` would not cover them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulation.scripts import load_script

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    # Run as a script, this folder leads sys.path: benchmarks/gateway.py would shadow the
    # gateway package, and the repository root (tuneshield) must be importable.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")  # fmt: skip
SAMPLES_FILE = "samples.jsonl"
REPORT_JSON = "gpu_round.json"
REPORT_MD = "gpu_round.md"
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow",
            "tokenizers", "safetensors", "huggingface-hub")  # fmt: skip
# --tiny: a 2-layer model of SmolLM2's vocabulary (the CPU test of this script).
TINY_LAYERS = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}  # fmt: skip
# Seconds per optimizer step are measured in the round; an optional step runs only if its
# estimate, times this margin, fits in the time left.
ESTIMATE_MARGIN = 1.5
PROGRESS_EVERY = 50


# -- prepare (here, the project's venv) ---------------------------------------------------


def prepare(out: Path, dialogs: int, seed: int) -> None:
    """The round's samples before training (classified, healed) and the model's files."""
    from learner.contracts import RoundSettings
    from learner.round_pipeline import RoundPlan
    from learner.snapshot import turns_to_samples
    from tuneshield import (
        TransformersChat,
        build_judge,
        classify,
        coherence_scores,
        heal,
        resolve_model,
        write_samples,
    )

    bench = load_script("round")
    out.mkdir(parents=True, exist_ok=True)
    source = Path(resolve_model("default"))
    (out / "model").mkdir(exist_ok=True)
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / "model" / name)
    plan = RoundPlan.from_policy(seed=seed)
    settings = RoundSettings.from_policies(plan=plan, skip_gates=True)
    users = bench.plan_dialogs(dialogs, 0.3, "injection", 3, seed)
    turns = bench.logged_turns(users, "gpu-round", "chat", "v0")
    rows = [dataclasses.asdict(turn) for turn in turns]
    samples = turns_to_samples(rows, target=plan.target, context_turns=plan.context_turns)
    print(f"{len(users)} dialogs, {len(rows)} turns, {len(samples)} samples", flush=True)
    judge = build_judge(plan.judge, settings.judges_policy())
    start = time.perf_counter()
    data = classify(samples, judge)
    flagged = sum(bool(s["toxic"]) for s in data)
    print(f"classified in {time.perf_counter() - start:.0f} s: {flagged} flagged", flush=True)
    start = time.perf_counter()
    data = heal(
        data,
        settings.heal_config(),
        backend=TransformersChat("default"),
        recheck=judge.score,
        recheck_threshold=judge.threshold,
        coherence=coherence_scores,
        progress=lambda done, total: print(f"  healed {done}/{total}", flush=True),
    )
    print(f"healed in {time.perf_counter() - start:.0f} s", flush=True)
    write_samples(data, out / SAMPLES_FILE)
    meta = {"dialogs": dialogs, "seed": seed, "turns": len(rows), "samples": len(data),
            "flagged": flagged, "plan": plan.to_json()}  # fmt: skip
    (out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# -- run (there: python3 with torch and the carried wheels) ------------------------------


@dataclasses.dataclass
class Run:
    """The report being built, written after every step."""

    out: Path
    budget_s: float
    started: float = dataclasses.field(default_factory=time.monotonic)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def step(self, name: str, action: Callable[[], Any]) -> Any:
        """Run one step; its result (or its error) goes into the report, then to disk."""
        print(f"[{time.monotonic() - self.started:6.1f} s] {name} ...", flush=True)
        begin = time.monotonic()
        try:
            result = action()
        except Exception as error:  # a failed step is reported; the next ones still run
            trace = traceback.format_exc()
            print(trace, file=sys.stderr, flush=True)
            self.report.setdefault("errors", {})[name] = {
                "error": f"{type(error).__name__}: {error}",
                "traceback": trace[-4000:],
            }
            result = None
        self.report.setdefault("step_seconds", {})[name] = round(time.monotonic() - begin, 1)
        self.write()
        return result

    def skip(self, name: str, reason: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {name} skipped: {reason}", flush=True)
        self.report.setdefault("skipped", {})[name] = reason
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.report, indent=2, default=str) + "\n"
        (self.out / REPORT_JSON).write_text(text, encoding="utf-8")
        (self.out / REPORT_MD).write_text(markdown(self.report), encoding="utf-8")


def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "cpu_threads": torch.get_num_threads(),
    }


def build_model(data: Path, target: Path, tiny: bool, seed: int) -> Path:
    """SmolLM2-135M's architecture (or ``--tiny``'s) and tokenizer with random weights,
    saved as a model folder that ``train_adapter`` loads like any other."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = data / "model"
    config = AutoConfig.from_pretrained(source)
    if tiny:
        for key, value in TINY_LAYERS.items():
            setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target


def load_samples(data: Path, max_dialogs: int | None) -> list[dict[str, Any]]:
    """The round's samples; with ``max_dialogs``, those of its first dialogs only."""
    from tuneshield import read_samples

    samples = read_samples(data / SAMPLES_FILE)
    if max_dialogs is None:
        return samples
    keep = sorted({s["conversation_id"] for s in samples})[:max_dialogs]
    return [s for s in samples if s["conversation_id"] in set(keep)]


def undefended(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples as the undefended round trains them: logged replies, nothing flagged,
    and none of the answers healing added to flagged turns."""
    from tuneshield import FLAGGED_DRAFT, is_answer

    # Every mark the defense adds, the SFT screens' (unrelated, deflects) included.
    drop = ("toxic", "toxic_score", "judge", "original_response", "heal_mode", "unrelated",
            "deflects", FLAGGED_DRAFT)  # fmt: skip
    return [
        {
            **{k: v for k, v in s.items() if k not in drop},
            "response": s.get("original_response") or s["response"],
        }
        for s in samples
        if not is_answer(s)
    ]


def round_config(parity_steps: int | None = None, bf16: bool | None = None) -> Any:
    """policies/training.yaml with the round plan's seed and epochs (policies/learner.yaml
    ``round``; read here, not through ``learner``, whose package imports the gateway)."""
    from tuneshield import read_policy, scaled_train_config

    plan = read_policy("learner")["round"]
    config = scaled_train_config(
        plan["seed"], plan["sft_epochs"], plan["dpo_epochs"], plan["max_steps"],
        sft_learning_rate=plan.get("sft_learning_rate"),
        dpo_learning_rate=plan.get("dpo_learning_rate"),
    )  # fmt: skip
    if parity_steps is not None:
        from tuneshield import override_stage

        config = override_stage(config, "sft", max_steps=parity_steps)
        config = override_stage(config, "dpo", max_steps=max(1, parity_steps // 2))
    if bf16 is not None:
        config = dataclasses.replace(config, bf16=bf16)
    return config


def progress_printer(started: float) -> Callable[[str, int, int], None]:
    def report(stage: str, step: int, total: int) -> None:
        if step == 0 or step == total or step % PROGRESS_EVERY == 0:
            elapsed = time.monotonic() - started
            print(f"  {stage} step {step}/{total} ({elapsed:.1f} s)", flush=True)

    return report


def stage_summary(stages: dict[str, Any], peak: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's stages, without per-step logs, with the share of the matmul peak."""
    summary = {}
    for name, stage in stages.items():
        kept = {k: v for k, v in stage.items() if k not in ("loss_history", "last_log")}
        if peak and stage.get("flops_per_s") is not None:
            kept["share_of_peak"] = stage["flops_per_s"] / peak["flops_per_s"]
        summary[name] = kept
    return summary


def train(
    base: Path, samples: list[dict[str, Any]], out: Path, config: Any, *, dpo: bool
) -> dict[str, Any]:
    from tuneshield import train_adapter

    result = train_adapter(base, samples, out, config, dpo=dpo,
                           progress=progress_printer(time.monotonic()))  # fmt: skip
    return result.manifest


def hot_swap(base: Path, adapter: Path) -> dict[str, Any]:
    """Verify the adapter as the learner does, then load it by name into a PEFT model that
    already serves another adapter and generate with it: the load and the first reply's
    seconds."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneshield._train import verify_adapter

    verify_adapter(adapter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = model.to(device)
    served = PeftModel.from_pretrained(model, str(adapter), adapter_name="v0")
    tokenizer = AutoTokenizer.from_pretrained(base)
    _sync()
    start = time.perf_counter()
    served.load_adapter(str(adapter), adapter_name="v1")
    served.set_adapter("v1")
    _sync()
    loaded = time.perf_counter() - start
    encoded: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello, how are you?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt = encoded.to(device)
    start = time.perf_counter()
    with torch.no_grad():
        reply = served.generate(**prompt, max_new_tokens=16, do_sample=False)
    _sync()
    return {
        "verified": True,
        "adapters": list(served.peft_config),
        "load_s": round(loaded, 4),
        "first_reply_s": round(time.perf_counter() - start, 3),
        "reply_tokens": int(reply.shape[-1] - prompt["input_ids"].shape[-1]),
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parity(base: Path, samples: list[dict[str, Any]], scratch: Path, steps: int) -> dict[str, Any]:
    """The same SFT and DPO steps from the same seed in bf16 and in fp32: per-step losses."""
    losses: dict[str, dict[str, list[float]]] = {}
    timing: dict[str, dict[str, float]] = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        manifest = train(base, samples, scratch / f"parity-{name}",
                         round_config(steps, bf16), dpo=True)  # fmt: skip
        losses[name] = {stage: [e["loss"] for e in manifest["stages"][stage]["loss_history"]]
                        for stage in ("sft", "dpo")}  # fmt: skip
        timing[name] = {stage: manifest["stages"][stage]["train_s"] for stage in ("sft", "dpo")}
    gaps = {}
    for stage in ("sft", "dpo"):
        pairs = list(zip(losses["bf16"][stage], losses["fp32"][stage], strict=False))
        relative = [abs(a - b) / abs(b) for a, b in pairs if b]
        gaps[stage] = {
            "steps": len(pairs),
            "max_relative_difference": max(relative, default=None),
            "mean_relative_difference": sum(relative) / len(relative) if relative else None,
            "final_bf16": pairs[-1][0] if pairs else None,
            "final_fp32": pairs[-1][1] if pairs else None,
        }
    return {"losses": losses, "train_s": timing, "comparison": gaps}


def parity_estimate(sft: dict[str, Any], dpo: dict[str, Any], steps: int) -> float:
    """Seconds the parity runs should take, from the round's own stages: per precision,
    both stages' setup (tokenising, the reference pass) and ``steps`` SFT + ``steps / 2``
    DPO steps; fp32 steps counted at twice bf16's, a DPO step at its measured cost."""
    setup = float(sft.get("setup_s") or 0.0) + float(dpo.get("setup_s") or 0.0)
    sft_step = float(sft.get("seconds_per_step") or 0.0)
    dpo_step = float(dpo.get("seconds_per_step") or sft_step)
    bf16 = setup + steps * sft_step + steps / 2 * dpo_step
    fp32 = setup + 2 * (steps * sft_step + steps / 2 * dpo_step)
    return (bf16 + fp32) * ESTIMATE_MARGIN


def run(args: argparse.Namespace) -> int:
    out = args.out or Path(os.environ.get("OUT") or "gpu_round_out")
    state = Run(out=out, budget_s=args.budget_s)
    report = state.report
    report["command"] = " ".join(sys.argv)
    report["environment"] = state.step("environment", environment)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-round-"))
    try:
        base = state.step("model", lambda: build_model(args.data, scratch / "base", args.tiny, 0))
        if base is None:
            return 1
        samples = load_samples(args.data, args.max_dialogs)
        flagged = sum(bool(s.get("toxic")) for s in samples)
        report["data"] = {"samples": len(samples), "flagged": flagged,
                          "dialogs": len({s["conversation_id"] for s in samples})}  # fmt: skip
        from tuneshield._train import detect_device, measure_matmul_peak

        policy = round_config()
        device = detect_device(policy.bf16)
        report["device"] = dataclasses.asdict(device)
        peaks = state.step("matmul_peak", lambda: {
            "bf16": measure_matmul_peak(dataclasses.replace(device, bf16=True)),
            "fp32": measure_matmul_peak(dataclasses.replace(device, bf16=False)),
        })  # fmt: skip
        peak = (peaks or {}).get("bf16" if device.bf16 else "fp32")
        report["matmul_peak"] = peaks

        manifest = state.step("tuneshield_round", lambda: train(
            base, samples, scratch / "adapter", policy, dpo=True))  # fmt: skip
        if manifest is not None:
            report["tuneshield_round"] = {
                "config": manifest["config"],
                "device": manifest["device"],
                "stages": stage_summary(manifest["stages"], peak),
                "loss_curves": {
                    stage: manifest["stages"][stage].get("loss_history") for stage in ("sft", "dpo")
                },
            }
            report["hot_swap"] = state.step("hot_swap", lambda: hot_swap(base, scratch / "adapter"))
        stages = (report.get("tuneshield_round") or {}).get("stages", {})
        sft, dpo = stages.get("sft") or {}, stages.get("dpo") or {}
        # Parity first (the brief's figure), then the undefended SFT (a comparison).
        estimate = parity_estimate(sft, dpo, args.parity_steps)
        if state.left_s() < estimate:
            state.skip("parity", f"{state.left_s():.0f} s left, ~{estimate:.0f} needed")
        else:
            report["parity"] = state.step("parity", lambda: parity(
                base, samples, scratch, args.parity_steps))  # fmt: skip
        estimate = float(sft.get("duration_s") or 0.0) * ESTIMATE_MARGIN
        if args.no_undefended:
            state.skip("undefended_round", "--no-undefended")
        elif state.left_s() < estimate:
            state.skip("undefended_round", f"{state.left_s():.0f} s left, ~{estimate:.0f} needed")
        else:
            plain = state.step("undefended_round", lambda: train(
                base, undefended(samples), scratch / "undefended", policy, dpo=False))  # fmt: skip
            if plain is not None:
                report["undefended_round"] = {"stages": stage_summary(plain["stages"], peak)}
        report["total_s"] = round(time.monotonic() - state.started, 1)
        state.write()
        print(markdown(report), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if report.get("errors") else 0


# -- the report ---------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what docs/training.md quotes)."""
    lines = ["# GPU round", ""]
    env = report.get("environment") or {}
    device = report.get("device") or {}
    data = report.get("data") or {}
    lines += [
        f"- device: {', '.join(env.get('gpus') or []) or 'CPU'}; trains on {device.get('name')}"
        f" ({device.get('reason')}); versions {env.get('versions')}",
        f"- data: {data.get('samples')} samples of {data.get('dialogs')} dialogs, "
        f"{data.get('flagged')} flagged; command `{report.get('command')}`",
    ]
    for precision, peak in (report.get("matmul_peak") or {}).items():
        lines.append(f"- matmul peak {precision}: {_fmt(peak['flops_per_s'] / 1e12, '.3g')} "
                     f"TFLOP/s ({peak['size']}^3 products)")  # fmt: skip
    lines += [
        "",
        "| round | stage | rows | steps | seconds (setup) | tokens/s | padding | "
        "peak GPU MiB | TFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ("tuneshield_round", "undefended_round"):
        for stage, row in ((report.get(arm) or {}).get("stages") or {}).items():
            if "skipped" in row:
                lines.append(f"| {arm} | {stage} | skipped: {row['skipped']} |||||||")
                continue
            achieved = row.get("flops_per_s")
            lines.append(
                f"| {arm} | {stage} | {row['rows']} | {row['steps']} | "
                f"{row['duration_s']} ({row['setup_s']}) | {_fmt(row['tokens_per_s'], '.0f')} | "
                f"{_fmt(row['padding_share'], '.1%')} | {_fmt(row['peak_gpu_mb'], '.0f')} | "
                f"{_fmt(achieved / 1e12 if achieved else None, '.3g')} | "
                f"{_fmt(row.get('share_of_peak'), '.1%')} |"
            )
    swap = report.get("hot_swap")
    if swap:
        lines += [
            "",
            f"Adapter verified; loaded by name into a served PEFT model in {swap['load_s']} s,"
            f" first 16-token reply {swap['first_reply_s']} s.",
        ]
    check = (report.get("parity") or {}).get("comparison")
    if check:
        lines += [
            "",
            "| parity (bf16 vs fp32, same seed and data) | steps | max rel. diff | "
            "mean rel. diff | final bf16 | final fp32 |",
            "|---|---|---|---|---|---|",
        ]
        for stage, row in check.items():
            lines.append(
                f"| {stage} | {row['steps']} | {_fmt(row['max_relative_difference'], '.2%')} | "
                f"{_fmt(row['mean_relative_difference'], '.2%')} | "
                f"{_fmt(row['final_bf16'], '.4f')} | {_fmt(row['final_fp32'], '.4f')} |"
            )
    for section in ("skipped", "errors"):
        for name, what in (report.get(section) or {}).items():
            text = what["error"] if isinstance(what, dict) else what
            lines.append(f"- {section[:-1] if section == 'errors' else 'skipped'} {name}: {text}")
    if "total_s" in report:
        lines.append(f"\nTotal {report['total_s']} s.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="here: the model's files and the samples")
    make.add_argument("--out", type=Path, default=Path(".gpu_model"))
    make.add_argument("--dialogs", type=int, default=1000)
    make.add_argument("--seed", type=int, default=0)
    go = commands.add_parser("run", help="there: train, measure, report")
    go.add_argument("--data", type=Path, default=Path(".gpu_model"), help="prepare's --out")
    go.add_argument("--out", type=Path, help="report folder (default: $OUT)")
    go.add_argument("--budget-s", type=float, default=330.0, help="skip optional steps past it")
    go.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU test)")
    go.add_argument("--max-dialogs", type=int, help="the samples of the first N dialogs")
    go.add_argument("--parity-steps", type=int, default=40, help="SFT steps (DPO: half)")
    go.add_argument("--no-undefended", action="store_true", help="skip the undefended SFT")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.dialogs, args.seed)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
