"""Demo defaults that need no network: the bundled instruction data, a tokenizer trained on it, and a tiny Llama.

Everything here is built offline and deterministically in well under a second, so examples, tests and benchmarks
can run TRL's trainers end to end without the Hugging Face Hub:

```python
from rf_callbacks.demo import demo_datasets, tiny_model_and_tokenizer

model, tokenizer = tiny_model_and_tokenizer()
train_dataset, eval_dataset = demo_datasets()
```

The tokenizer's chat template is ChatML-like and wraps each assistant turn, end-of-turn token included, in
`{% generation %}` markers, so `SFTConfig(assistant_only_loss=True)` trains the model to stop.

Heavy libraries (`torch`, `transformers`, `datasets`, `tokenizers`) are imported inside the functions, so importing
this module stays cheap.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
TURN_START_TOKEN = "<|im_start|>"
# The end-of-turn token doubles as EOS, so generation stops exactly where an assistant turn ends.
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, TURN_START_TOKEN, EOS_TOKEN]

# LoRA trains neither the final norm nor the (tied) output embedding, so on a random base they fix how far any adapter
# can move the logits. With Llama's defaults (std 0.02, gain 1) the logits stay within about +-1.3, the predictions
# near uniform and the loss above ln(vocab) - 1 whatever the config. A wider init and a gain of 4 let a LoRA r=4 take
# the demo loss from ~8 to ~4.3 in 300 steps at lr 1e-3 (and ~2.7 at 1e-2), so configs separate visibly.
INIT_STD = 0.05
OUTPUT_GAIN = 4.0

# The assistant's end-of-turn token sits inside `{% generation %}` so `assistant_only_loss=True` trains it (TRL's
# `is_chat_template_stop_token_trained` check); the newline after it stays outside, as in Qwen's training templates.
# Each turn renders the same whatever follows it, which keeps the template prefix-preserving.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- elif message['content'] is none -%}{%- set content = '' -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _read_rows() -> list[dict[str, str]]:
    path = resources.files("rf_callbacks") / "data" / "instructions.jsonl"
    with path.open("r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_instructions() -> Dataset:
    """
    Load the bundled instruction-tuning data (`rf_callbacks/data/instructions.jsonl`).

    Returns:
        `datasets.Dataset`: One row per example, with string columns `instruction` and `response`.
    """
    from datasets import Dataset

    return Dataset.from_list(_read_rows())


def to_chat(row: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """
    Map an instruction row to TRL's conversational prompt-completion format.

    Args:
        row (`dict`):
            A row with `instruction` and `response` keys; other keys are ignored.

    Returns:
        `dict`: `{"prompt": [user message], "completion": [assistant message]}`.
    """
    return {
        "prompt": [{"role": "user", "content": row["instruction"]}],
        "completion": [{"role": "assistant", "content": row["response"]}],
    }


def demo_datasets(eval_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """
    Split the bundled data into train and eval sets in TRL's conversational prompt-completion format.

    Args:
        eval_fraction (`float`, *optional*, defaults to `0.1`):
            Fraction of rows held out for evaluation, strictly between 0 and 1.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffle that decides the split; the same seed always gives the same rows in the same order.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: `(train_dataset, eval_dataset)`, each with columns `prompt` and
        `completion` only.
    """
    from datasets import Dataset

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
    rows = _read_rows()
    # A local RNG over row indices (not `train_test_split`) keeps the split independent of numpy and of the global
    # random state, and `from_list` avoids `map`'s progress bars and cache.
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    eval_rows = [to_chat(rows[i]) for i in order[:n_eval]]
    train_rows = [to_chat(rows[i]) for i in order[n_eval:]]
    return Dataset.from_list(train_rows), Dataset.from_list(eval_rows)


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(texts: tuple[str, ...] | None, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if texts is None:
        # Role names are part of the training text so the template's "user\n"/"assistant\n" become few tokens.
        texts = tuple(f"user\n{r['instruction']}\nassistant\n{r['response']}\n" for r in _read_rows())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Untrimmed offsets let `return_assistant_tokens_mask` map the generation spans onto tokens exactly.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so no unknown token is needed
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """
    Train a byte-level BPE tokenizer offline and wrap it with a ChatML-like chat template.

    The special tokens are `<|pad|>` (padding), `<|bos|>` (start of every rendered chat), `<|im_start|>` and
    `<|im_end|>` (turn delimiters; `<|im_end|>` is also the EOS token). The chat template supports
    `add_generation_prompt` and marks assistant content plus its `<|im_end|>` with `{% generation %}`.

    Args:
        texts (`Iterable[str]`, *optional*):
            Training text. Defaults to the bundled instruction data rendered with role names.
        vocab_size (`int`, *optional*, defaults to `1024`):
            Target vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        `transformers.PreTrainedTokenizerFast`: A fresh tokenizer; the same arguments always give the same vocabulary.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # Training is cached per input, so repeated builds (tests, one tokenizer per run) cost only deserialisation;
    # each call still returns its own object because trainers mutate the tokenizer (e.g. its pad token).
    key = None if texts is None else tuple(texts)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(key, vocab_size)),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """
    Build a randomly initialised Llama-shaped causal LM sized for `tokenizer`.

    The modules carry the standard Llama names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    `down_proj`), so LoRA `target_modules=["q_proj", "v_proj"]` and `"all-linear"` both apply.

    Args:
        tokenizer (`PreTrainedTokenizerFast`):
            Tokenizer whose length sets the vocabulary size and whose pad/BOS/EOS ids go into the config.
        hidden_size (`int`, *optional*, defaults to `64`):
            Width of the residual stream; must be divisible by `num_heads`.
        num_layers (`int`, *optional*, defaults to `2`):
            Number of decoder layers.
        num_heads (`int`, *optional*, defaults to `4`):
            Number of attention heads (and key/value heads).
        intermediate_size (`int`, *optional*):
            Width of the MLP. Defaults to `4 * hidden_size`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation. The global torch RNG state is left untouched.

    Returns:
        `transformers.LlamaForCausalLM`: A float32 model on the CPU with tied input/output embeddings, weights drawn
        with std `INIT_STD` and the final norm's gain set to `OUTPUT_GAIN` (see their comments).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
        dtype=torch.float32,
    )
    # Eager attention is bit-reproducible on every backend and costs nothing at this size.
    config._attn_implementation = "eager"
    # Initialise under a forked RNG so building a model never shifts the data order or dropout masks of a run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(OUTPUT_GAIN)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float()


def tiny_model_and_tokenizer(
    hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """
    Build the default demo tokenizer and a tiny model for it.

    Args:
        hidden_size (`int`, *optional*, defaults to `64`):
            Width of the model, see [`build_tiny_model`].
        num_layers (`int`, *optional*, defaults to `2`):
            Number of decoder layers.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation.

    Returns:
        `tuple[LlamaForCausalLM, PreTrainedTokenizerFast]`: `(model, tokenizer)`.
    """
    tokenizer = build_tokenizer()
    return build_tiny_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed), tokenizer
