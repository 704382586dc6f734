"""A tiny local Hugging Face Llama model, built without downloads, for a real vLLM on CPU.

Run it with the vLLM environment's python (it needs torch, transformers, tokenizers)::

    python tests/fakes/tiny_hf_model.py OUTDIR

OUTDIR then holds a byte-level BPE tokenizer with a chat template and a 2-layer Llama
with random weights in safetensors: enough for vLLM to start, sleep, wake and answer
with garbage, which is all that tests of process management need.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

# These live only in the vLLM environment, not in the one that type-checks the tests.
import torch  # type: ignore[import-not-found, unused-ignore]
from tokenizers import (  # type: ignore[import-not-found, unused-ignore]
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (  # type: ignore[import-not-found, unused-ignore]
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 1000
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SUBJECTS = ["the model", "a daemon", "my server", "this queue", "the proxy", "one request",
            "every client", "the kernel", "a backend", "your GPU"]  # fmt: skip
VERBS = ["loads", "swaps", "streams", "answers", "evicts", "waits for", "starts", "stops",
         "measures", "reads"]  # fmt: skip
OBJECTS = ["weights quickly.", "tokens in order.", "memory on demand.", "the next prompt?",
           "a small reply!", "JSON over HTTP."]  # fmt: skip
SYLLABLES = ["ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "ze", "pa", "qu", "ja", "bo", "fe",
             "gi", "hu", "wy", "xe", "do", "cy"]  # fmt: skip


def training_lines() -> list[str]:
    """Return 600 synthetic sentences, each with a made-up word and a number.

    The made-up words give the BPE trainer enough distinct pairs to fill the vocabulary.
    """
    sentences = [f"{s} {v} {o}" for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    n = len(SYLLABLES)
    words = [
        SYLLABLES[i % n] + SYLLABLES[i // n % n] + SYLLABLES[i * 7 % n]
        for i in range(len(sentences))
    ]
    return [
        f"{s} {w} {i * 37 % 1000}" for i, (s, w) in enumerate(zip(sentences, words, strict=True))
    ]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (any text encodes) and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    roles = dict(
        zip(("unk_token", "bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS, strict=True)
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256, **roles)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Return a randomly initialised 2-layer Llama sized for the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # vLLM's CPU attention backend only supports some head sizes (32, 64, 80, ...).
        head_dim=32,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def write_tiny_hf_model(outdir: Path) -> Path:
    """Write tokenizer, config and safetensors weights to ``outdir`` and return it."""
    outdir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(outdir)
    build_model(tokenizer).save_pretrained(outdir)
    return outdir


def main() -> None:
    """Write the model to the folder given on the command line."""
    parser = argparse.ArgumentParser(description="Write a tiny random Llama for vLLM.")
    parser.add_argument("outdir", type=Path)
    print(write_tiny_hf_model(parser.parse_args().outdir))


if __name__ == "__main__":
    main()
