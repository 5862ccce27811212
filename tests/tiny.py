"""Tiny offline tokenizers and models for the tests (nothing is downloaded)."""

from __future__ import annotations

import functools

import torch

CORPUS = [
    "the movie was great and the acting was good",
    "a terrible film , it was bad and boring",
    "It was great",
    "It was terrible",
    "Yes No Maybe",
    "Question : what is the answer ? Answer : Paris",
    "the cat sat on the mat because it was tired so it slept",
    "Review : Sentiment : positive negative",
    "Title Context Question Answer Passage",
    "Does this mean that it is true ? Yes or No ?",
    "London Paris Berlin one two three four five 1 2 3 4 5 6 7 8 9 0",
    "Yes",
    "No",
    "Maybe",
]


@functools.lru_cache(maxsize=None)
def tokenizer(masked: bool = False):
    """A byte-level BPE tokenizer trained on CORPUS (GPT-2 / RoBERTa style: ' great' is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if masked:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
        )
    from tokenizers import AddedToken

    # As RoBERTa's: the mask token swallows the space before it, so " <mask>" is one token.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        mask_token=AddedToken("<mask>", lstrip=True, special=True),
    )


def _init(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def causal_lm(family: str = "llama", seed: int = 0, vocab_size: int | None = None):
    """A tiny random causal LM of the given family (llama, opt, gpt2)."""
    import transformers as tf

    vocab = vocab_size or len(tokenizer())
    if family == "llama":
        config = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        model = tf.LlamaForCausalLM(config)
    elif family == "opt":
        config = tf.OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
            pad_token_id=0,
        )
        model = tf.OPTForCausalLM(config)
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
        model = tf.GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return _init(model, seed)


def masked_lm(family: str = "roberta", seed: int = 0):
    """A tiny random masked LM (roberta or bert)."""
    import transformers as tf

    vocab = len(tokenizer(masked=True))
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=260,
        pad_token_id=0,
    )
    if family == "roberta":
        model = tf.RobertaForMaskedLM(tf.RobertaConfig(**kwargs))
    else:
        model = tf.BertForMaskedLM(tf.BertConfig(**kwargs))
    return _init(model, seed)


def mlp(seed: int = 0):
    """A two-layer classifier (6 -> 8 -> 3, tanh) with weights drawn from ``seed``: for optimizer tests."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


MLP_X = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))  # ten examples for mlp()
MLP_Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
