"""In-process generation speed by batch size (TransformersChat.generate on the CPU).

    .venv/bin/python benchmarks/generation.py [--model default] [--batch-sizes 8,32]
                                              [--probes 24] [--max-new-tokens 32]

Generates one sampled reply per held-out toxic probe at each batch size and prints tokens/s
and the ratio against the first batch size (the baseline, measured in the same run). The
healing policy's batch_size and TransformersChat's default rest on this figure.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simulation.sigterm import unwinds_on_sigterm
from tuneshield import GenerationConfig, TransformersChat, load_probes


@unwinds_on_sigterm
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--probes", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    conversations = [probe["context"] for probe in load_probes("toxic")[: args.probes]]
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=1
    )
    baseline: float | None = None
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        chat = TransformersChat(args.model, batch_size=batch_size)
        started = time.perf_counter()
        replies = chat.generate(conversations, generation)
        seconds = time.perf_counter() - started
        tokens = sum(len(chat.tokenizer(reply)["input_ids"]) for reply in replies)
        rate = tokens / seconds
        baseline = baseline or rate
        print(
            f"batch {batch_size:3}: {len(replies)} replies, {tokens} tokens in {seconds:.1f} s "
            f"= {rate:.1f} tokens/s, ratio to batch {args.batch_sizes.split(',')[0]}: "
            f"{rate / baseline:.2f}"
        )


if __name__ == "__main__":
    main()
