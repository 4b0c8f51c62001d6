"""Train the fact world's byte-level BPE tokenizer with ``tokenizers``."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .prompts import CHAT_TEMPLATE, ROLE_TOKENS

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, *ROLE_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts``.

    It has ``<s>``, ``</s>``, ``<pad>`` and the role markers as special tokens and carries the
    chat template, so ``AutoTokenizer.from_pretrained`` and ``apply_chat_template`` work on
    the saved directory. It adds no special tokens when encoding: the chat template writes
    ``<s>`` itself.
    """
    tok = Tokenizer(models.BPE())
    # Pre-tokens are lines, cut again before each capitalised word (the names): the fixed
    # instruction and question stems repeat thousands of times and merge into a few tokens,
    # which halves the training cost, while names stay apart from the stems. A newline is
    # always its own token, so "<|assistant|>\n" ends a prompt the same way in training and
    # in generation.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split(Regex(" (?=[A-Z])"), behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
