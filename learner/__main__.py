"""``python -m learner ROUND_DIR``: one learning round's worker (``learner.worker``).

Its own entry module, because the package already imports ``learner.worker`` (for the
status file's format): run as ``-m learner.worker`` that module would load twice, and
runpy warns about it at the top of every round's log.
"""

from learner.worker import main

raise SystemExit(main())
