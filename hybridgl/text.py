"""Text features (spec section 3, adopted from Global-Local CLIP).

t = w * f(sentence) + (1 - w) * f(noun_phrase) with raw CLIP text features; every other noun
phrase is encoded as "a photo of " + phrase and the features are averaged into f_neg.
"""
from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass

import ftfy
import torch
from torch import nn

from .config import HybridGLConfig
from .parsing import ParsedExpression
from .precision import ieee_float32

log = logging.getLogger("hybridgl.text")


def clip_clean(text: str) -> str:
    """The text as OpenAI's `clip.tokenize` (the reference's tokenizer) sees it before BPE.

    Hugging Face's CLIP tokenizer applies only NFC, whitespace folding and lower-casing, so its ids
    differ from the reference's wherever ftfy or html.unescape would change the text ("&amp;",
    curly quotes, full-width letters, mojibake).
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
@ieee_float32
def encode_text(clip: nn.Module, tokenizer, text: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """One string -> its raw (unnormalised) CLIP text feature [D].

    The text is cleaned as the reference's tokenizer cleans it (`clip_clean`). Text over CLIP's
    context length is truncated with a warning, never an error: the end-of-text
    token is kept, so the feature is that of the first tokens.
    """
    limit = int(clip.text_model.config.max_position_embeddings)
    text = clip_clean(text)
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]  # its warning says "indexing
    # errors", which the truncation below prevents; ours says what happens
    if len(ids) > limit:
        log.warning("expression of %d tokens truncated to CLIP's %d: %.60r...", len(ids), limit, text)
        ids = ids[: limit - 1] + [ids[-1]]
    input_ids = torch.tensor([ids], device=device)
    pooled = clip.text_model(input_ids=input_ids).pooler_output  # the EOT token after the final layernorm
    return clip.text_projection(pooled)[0].float()


@dataclass
class TextFeatures:
    """Raw text features of one parsed expression, each [D]; `neg` is None without other nouns."""

    sentence: torch.Tensor
    noun_phrase: torch.Tensor
    mixed: torch.Tensor
    neg: torch.Tensor | None


def text_features(clip: nn.Module, tokenizer, parse: ParsedExpression, config: HybridGLConfig,
                  device: torch.device | str = "cpu") -> TextFeatures:
    sentence = encode_text(clip, tokenizer, parse.sentence, device)
    noun_phrase = encode_text(clip, tokenizer, parse.noun_phrase, device)
    mixed = config.sentence_weight * sentence + (1 - config.sentence_weight) * noun_phrase
    neg = None
    if parse.other_nouns:
        neg = torch.stack([encode_text(clip, tokenizer, config.other_prompt + o, device)
                           for o in parse.other_nouns]).mean(dim=0)
    return TextFeatures(sentence, noun_phrase, mixed, neg)
