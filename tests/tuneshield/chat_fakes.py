"""A chat backend for tests of code that generates (healing, evaluation) or judges.

``FakeChat`` implements ``tuneshield.ChatBackend`` once: it records what it was asked,
reports every reply as finished, and leaves the replies to ``write``, which a test's
subclass overrides. Judges ask for ``next_token_logprobs`` instead: a subclass that
answers them overrides that, and sets ``generates = False`` when generating is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence

from tuneshield._backends import GenerationConfig, ReplyProgress, TopLogprobs
from tuneshield._samples import Message


class FakeChat:
    """Records every ``generate`` call; ``write`` makes the replies."""

    name = "fake"
    generates = True

    def __init__(self) -> None:
        self.prompts: list[list[Message]] = []
        self.configs: list[GenerationConfig] = []
        self.calls = 0

    def write(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        """One reply per conversation, in order."""
        raise NotImplementedError

    def next_token_logprobs(
        self, conversations: Sequence[Sequence[Message]], top_k: int
    ) -> list[TopLogprobs]:
        raise AssertionError(f"{type(self).__name__} was asked for logprobs")

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        config: GenerationConfig,
        progress: ReplyProgress | None = None,
    ) -> list[str]:
        if not self.generates:
            raise AssertionError(f"{type(self).__name__} was asked to generate")
        self.calls += 1
        self.configs.append(config)
        self.prompts.extend(list(c) for c in conversations)
        replies = self.write(conversations)
        if progress is not None:
            for done in range(1, len(replies) + 1):
                progress(done)
        return replies
