"""The learner: rounds, registry, hot-swap."""
