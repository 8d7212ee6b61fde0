"""A tiny Llama (and Qwen2) with a real byte-level BPE tokenizer and a chat template, saved as a user's model folder
would be.

The model builder of onnxruntime-genai finds the LM head by its output size, so intermediate_size must differ from
the vocabulary size (176 vs 300 here).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
CORPUS = [
    "the capital of france is paris and the capital of italy is rome",
    "hello world, how are you today? fine, thank you",
    "a gripping, funny film with a dull middle",
]


def byte_bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tiny_config(config_class: type, vocab_size: int, layers: int) -> object:
    return config_class(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,  # not the vocabulary size: the builder finds the LM head by its output size
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_chat_llama(folder: Path | None = None, layers: int = 2, seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    return _tiny_chat(LlamaConfig, LlamaForCausalLM, folder, layers, seed)


def tiny_chat_qwen2(folder: Path | None = None, layers: int = 2, seed: int = 0) -> tuple[Qwen2ForCausalLM, object]:
    return _tiny_chat(Qwen2Config, Qwen2ForCausalLM, folder, layers, seed)


def _tiny_chat(config_class: type, model_class: type, folder: Path | None, layers: int, seed: int) -> tuple:
    tokenizer = byte_bpe_tokenizer()
    torch.manual_seed(seed)
    model = model_class(_tiny_config(config_class, len(tokenizer), layers)).eval()
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model, tokenizer


def train_briefly(model: LlamaForCausalLM, tokenizer: object, steps: int = 80, seed: int = 0) -> LlamaForCausalLM:
    """A few Adam steps on the corpus, so that the model's next-token choices are confident (as a real LM's are)
    and int4 rounding does not flip its greedy tokens."""
    torch.manual_seed(seed)
    batch = tokenizer(CORPUS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
