"""Text features (spec section 3, adopted from Global-Local CLIP).

t = w * f(sentence) + (1 - w) * f(noun_phrase) with raw CLIP text features; every other noun
phrase is encoded as "a photo of " + phrase and the features are averaged into f_neg.
"""
from __future__ import annotations

import html
import logging
import re
import threading
from collections import OrderedDict
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


class TextCache:
    """Text features already computed by one model, by text and device; the least recently used
    go first beyond `capacity`. Noun phrases, other nouns and GEM prompts recur across a dataset's
    expressions ("man", "a photo of man"), and each costs a pass of CLIP's text tower, most of a
    further expression's time. A hit is the same computation's result, bit for bit."""

    def __init__(self, capacity: int = 2048):
        self.capacity = capacity
        self._features: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # a backend segments from several threads
        self.hits = self.misses = 0

    def get(self, text: str, device: torch.device | str) -> torch.Tensor | None:
        key = (text, str(torch.device(device)))
        with self._lock:
            feature = self._features.get(key)
            if feature is None:
                self.misses += 1
                return None
            self.hits += 1
            self._features.move_to_end(key)
            return feature.clone()  # callers own what they get

    def put(self, text: str, device: torch.device | str, feature: torch.Tensor) -> None:
        with self._lock:
            self._features[(text, str(torch.device(device)))] = feature.clone()
            while len(self._features) > self.capacity:
                self._features.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._features.clear()

    def __len__(self) -> int:
        return len(self._features)


@torch.no_grad()
@ieee_float32
def encode_text(clip: nn.Module, tokenizer, text: str, device: torch.device | str = "cpu",
                cache: TextCache | None = None) -> torch.Tensor:
    """One string -> its raw (unnormalised) CLIP text feature [D] (from `cache` when it holds it).

    The text is cleaned as the reference's tokenizer cleans it (`clip_clean`). Text over CLIP's
    context length is truncated with a warning, never an error: the end-of-text
    token is kept, so the feature is that of the first tokens.
    """
    if cache is not None:
        feature = cache.get(text, device)
        if feature is not None:
            return feature
    limit = int(clip.text_model.config.max_position_embeddings)
    text = clip_clean(text)
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]  # its warning says "indexing
    # errors", which the truncation below prevents; ours says what happens
    if len(ids) > limit:
        log.warning("expression of %d tokens truncated to CLIP's %d: %.60r...", len(ids), limit, text)
        ids = ids[: limit - 1] + [ids[-1]]
    input_ids = torch.tensor([ids], device=device)
    pooled = clip.text_model(input_ids=input_ids).pooler_output  # the EOT token after the final layernorm
    feature = clip.text_projection(pooled)[0].float()
    if cache is not None:
        cache.put(text, device, feature)
    return feature


@dataclass
class TextFeatures:
    """Raw text features of one parsed expression, each [D]; `neg` is None without other nouns."""

    sentence: torch.Tensor
    noun_phrase: torch.Tensor
    mixed: torch.Tensor
    neg: torch.Tensor | None


def text_features(clip: nn.Module, tokenizer, parse: ParsedExpression, config: HybridGLConfig,
                  device: torch.device | str = "cpu", cache: TextCache | None = None) -> TextFeatures:
    sentence = encode_text(clip, tokenizer, parse.sentence, device, cache)
    noun_phrase = encode_text(clip, tokenizer, parse.noun_phrase, device, cache)
    mixed = config.sentence_weight * sentence + (1 - config.sentence_weight) * noun_phrase
    neg = None
    if parse.other_nouns:
        neg = torch.stack([encode_text(clip, tokenizer, config.other_prompt + o, device, cache)
                           for o in parse.other_nouns]).mean(dim=0)
    return TextFeatures(sentence, noun_phrase, mixed, neg)
