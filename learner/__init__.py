"""The control plane: learning rounds (snapshot → TuneShield worker → gates → registry →
hot-swap), their schedule, engine reconciliation, and the admin API gateways serve for
them. Exactly one learner is active per store (a leader lock); ``tuneshield learner`` runs
it alone, ``tuneshield serve`` beside the gateway and the engine in one process tree.
"""

from __future__ import annotations

from learner.admin_routes import AdapterAdmin
from learner.control import LeadershipLost, Learner
from learner.process import EmbeddedLearner, LearnerSettings, build_learner, run_learner
from learner.rounds import (
    ROUNDS_FOLDER,
    SUMMARY_FILE,
    ControlConfig,
    LearnerConfig,
    LearnerOptions,
    RoundBusy,
    RoundRunner,
    queue_round,
)
from learner.serve import bootstrap
from learner.worker import STATUS_FILE, read_status

__all__ = [
    "ROUNDS_FOLDER",
    "STATUS_FILE",
    "SUMMARY_FILE",
    "AdapterAdmin",
    "ControlConfig",
    "EmbeddedLearner",
    "LeadershipLost",
    "Learner",
    "LearnerConfig",
    "LearnerOptions",
    "LearnerSettings",
    "RoundBusy",
    "RoundRunner",
    "bootstrap",
    "build_learner",
    "queue_round",
    "read_status",
    "run_learner",
]
