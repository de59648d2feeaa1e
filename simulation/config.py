"""The demo's settings: ``policies/demo.yaml`` with one size chosen, plus CLI overrides."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from simulation.arms import ABLATIONS, select_arms
from tuneshield import ATTACK_KINDS, PolicyError, build_config, read_policy

POLICY = "demo"


@dataclass
class DemoSize:
    """How big one run is (a ``sizes`` entry of policies/demo.yaml)."""

    users: int = field(metadata={"help": "Simulated conversations per round (and arm)."})
    max_user_turns: int = field(metadata={"help": "Messages each user sends, at most."})
    rounds: int = field(metadata={"help": "Learning rounds per arm."})
    seeds: list[int] = field(metadata={"help": "One full run per seed (spread reported)."})
    sft_epochs: float = field(metadata={"help": "SFT epochs per round."})
    dpo_epochs: float = field(metadata={"help": "DPO epochs per round."})
    max_steps: int = field(metadata={"help": "Optimizer step cap per stage (-1: none)."})
    reply_max_tokens: int = field(metadata={"help": "Bot reply length during the chats."})
    probes: int = field(metadata={"help": "Held-out probes per kind."})
    samples_per_probe: int = field(metadata={"help": "Sampled replies per probe (T=1)."})
    eval_max_new_tokens: int = field(metadata={"help": "Longest evaluated reply."})
    perplexity_samples: int = field(metadata={"help": "Held-out benign dialogs for PPL."})
    heal_max_new_tokens: int = field(metadata={"help": "Longest contextual healing reply."})
    sft_learning_rate: float | None = field(
        default=None, metadata={"help": "SFT peak learning rate (null: training.yaml)."}
    )
    dpo_learning_rate: float | None = field(
        default=None, metadata={"help": "DPO peak learning rate (null: training.yaml)."}
    )

    def __post_init__(self) -> None:
        for name in (
            "users", "rounds", "probes", "samples_per_probe", "reply_max_tokens",
            "eval_max_new_tokens", "heal_max_new_tokens",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_user_turns < 2:
            raise ValueError(
                f"max_user_turns must be >= 2 (a user's first turn is no target), "
                f"got {self.max_user_turns}"
            )
        if self.perplexity_samples < 0:
            raise ValueError(f"perplexity_samples must be >= 0, got {self.perplexity_samples}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        self.seeds = [int(seed) for seed in self.seeds]


@dataclass
class DemoConfig:
    """One demo run (policies/demo.yaml), with the size already chosen."""

    size_name: str
    size: DemoSize
    arms: list[str]
    ablations: list[str]
    attack: str
    poison_rate: float
    weak_judge_recall: float
    model: str
    reply_temperature: float
    concurrency: int
    generation_concurrency: int
    address_pattern: str
    rate_limit_per_minute: float
    engine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.arms = select_arms(self.arms, self.ablations)
        if self.attack not in ATTACK_KINDS:
            raise ValueError(f"attack must be one of {ATTACK_KINDS}, got {self.attack!r}")
        if not 0.0 < self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in (0, 1], got {self.poison_rate}")
        if not 0.0 <= self.weak_judge_recall <= 1.0:
            raise ValueError(f"weak_judge_recall must be in [0, 1], got {self.weak_judge_recall}")
        for name in ("concurrency", "generation_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            re.compile(self.address_pattern)
        except re.error as error:
            raise ValueError(f"address_pattern: bad regex: {error}") from None

    @classmethod
    def from_policy(
        cls,
        size: str = "default",
        *,
        size_overrides: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> DemoConfig:
        """policies/demo.yaml at ``size``; ``None`` overrides keep the policy's value."""
        data = read_policy(POLICY)
        sizes = data.pop("sizes", {})
        if size not in sizes:
            raise PolicyError(f"size must be one of {sorted(sizes)}, got {size!r}")
        chosen = {
            **sizes[size],
            **{k: v for k, v in (size_overrides or {}).items() if v is not None},
        }
        size_config = build_config(DemoSize, chosen, f"policies/{POLICY}.yaml [{size}]")
        values = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        return build_config(cls, {"size_name": size, "size": size_config, **values}, POLICY)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ablation_names() -> list[str]:
    return sorted(ABLATIONS)
