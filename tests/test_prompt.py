"""The prompt starts the way the model was trained to see text start, whatever its tokenizer's flags say."""
from __future__ import annotations

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from ragblend.engine.prompt import PromptTemplate


@pytest.fixture
def plain_tokenizer(smollm_dir):
    """SmolLM2's tokenizer without its chat template: the shape of a base model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    tokenizer.chat_template = None
    return tokenizer


def test_a_base_model_whose_tokenizer_adds_bos_gets_its_bos_even_with_the_flag_off(plain_tokenizer):
    bos = plain_tokenizer.bos_token
    plain_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, plain_tokenizer.bos_token_id)])
    assert not getattr(plain_tokenizer, "add_bos_token", False)  # as GGUF-converted tokenizers report it
    assert PromptTemplate.for_tokenizer(plain_tokenizer).prefix_ids[0] == plain_tokenizer.bos_token_id


def test_a_tokenizer_that_adds_no_bos_gets_none(plain_tokenizer):
    assert PromptTemplate.for_tokenizer(plain_tokenizer).prefix_ids[0] != plain_tokenizer.bos_token_id


def test_a_chat_template_decides_the_start_itself(smollm_dir):
    """SmolLM2's template opens with its own header; nothing is put in front of it."""
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    assert tokenizer.decode(PromptTemplate.for_tokenizer(tokenizer).prefix_ids).startswith("<|im_start|>system\n")
