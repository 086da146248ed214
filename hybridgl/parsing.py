"""Parsing a referring expression (spec section 5).

Both parsers produce a dependency tree (words with a universal POS tag, a head and a relation)
and the same rules read the method's inputs off it:

- noun phrases: a noun (NOUN/PROPN, or the pronoun "one") with its left modifiers (det, amod,
  compound, nummod, nmod:poss, flat, and what hangs off them) as one contiguous span;
- target: the root's phrase when the root is a noun that is not a relation or null word, else the
  phrase of the root's subject or first noun dependent, else the whole expression (UD makes the
  predicate the root: in "the man is on the left" the root is "left" and the target "the man");
- other phrases: every other phrase whose head is not a relation word;
- relation and direction: among the keyword words, the one whose head comes earliest wins (ties:
  the first); a null word heading another phrase ("the left side") cancels the relation.

Where the spec is silent, these choices make the CLIP text describe the object in terse,
RefCOCO-style expressions ("person far right", "2nd from left", "blue shirt", "guy on rigth"):

- place words (the relation and direction keywords and center, corner, edge, end, row, foreground,
  background) are never the target nor another object: "person far right" targets "person" even
  where the tree makes "right" the head and "person" its compound, "2nd from left" has no noun
  naming an object and stands in whole, "guy in back row" names no other object;
- keyword variants count as the listed keyword (KEYWORD_FORMS): "-most" forms ("rightmost",
  "right-most"), superlatives of listed comparatives ("closest"/"nearest" as closer, "farthest"/
  "furthest"/"farther" as further, "biggest", "largest", "tiniest"), and misspellings of the position
  words (adjacent swaps, doubled or dropped letters: "rigth", "midle", "botom", "lft"). The sentence
  keeps the words as typed. "upper"/"lower" are not variants: with the spec's tie rule they would
  turn "upper left" into the vertical class, whose prior is off by default;
- a colour used as a noun ("guy in white") describes the target's clothes, not another object;
- an expression naming only clothes ("blue shirt", "striped shirt on left") refers to the person
  wearing them: the noun phrase becomes "person wearing blue shirt" (unless an owner is named,
  "man 's hat"); "white shirt guy" names the wearer and is left as it is;
- a corner ("top left donut") has two keywords on one head: the spec's tie rule gives the first
  ("up"); after the noun ("donut top left") the tree usually hangs "top" off "left" and "left" off
  the noun, so "left" wins. The method has one direction class; this follows the spec's rule.

`StanzaParser` gets the tree from stanza's English model (tokenize, pos, lemma, depparse).
`RuleParser` needs no model: a tokenizer, a closed-class lexicon and attachment heuristics build
an approximate tree. It is right on the short noun-phrase expressions of RefCOCO-style data (a
head noun, adjectives, prepositional phrases, participles, copulas, terse word order; see
tests/test_parsing_terse.py) and weaker on long clauses, coordination and unusual word order; which
parser ran is logged and stored in the result.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("hybridgl.parsing")

RELATIONS = ("none", "left", "right", "up", "down", "big", "small", "within")
DIRECTIONS = ("none", "left", "right", "middle", "up", "down")

# ReCLIP's keyword lists, as the reference code uses them.
RELATION_KEYWORDS = {
    "left": {"left", "west"},
    "right": {"right", "east"},
    "up": {"above", "north", "top", "back", "behind"},
    "down": {"below", "south", "under", "front"},
    "big": {"bigger", "larger", "closer"},
    "small": {"smaller", "tinier", "further", "smallest"},
    "within": {"inside", "within", "contained"},
}
DIRECTION_KEYWORDS = {
    "left": {"left"},
    "right": {"right"},
    "middle": {"middle", "between"},
    "up": {"up", "top", "above"},
    "down": {"down", "under", "bottom", "low"},
}
NULL_WORDS = {"part", "image", "side", "picture", "half", "region", "section", "photo"}
# Phrases headed by these are not "other objects" (the reference's RELATION_WORDS).
RELATION_WORDS = set().union(*RELATION_KEYWORDS.values()) | {"who", "what", "which", "middle"}
# Words that only say where the object is: never the target, never another object (a choice: the
# reference leaves phrases such as "the bottom" or "the corner" among the other objects).
PLACE_WORDS = RELATION_WORDS | set().union(*DIRECTION_KEYWORDS.values()) | {
    "center", "centre", "corner", "edge", "end", "row", "foreground", "background"}
# A colour as a noun ("guy in white") describes the target's clothes, not another object.
COLOUR_WORDS = {"red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
                "grey", "tan", "beige", "maroon", "navy", "teal", "gold", "silver"}
# An expression naming only clothes ("blue shirt") refers to the person wearing them.
CLOTHING_WORDS = {"shirt", "shirts", "tshirt", "t-shirt", "jacket", "coat", "dress", "sweater", "hoodie", "jersey",
                  "pants", "jeans", "shorts", "skirt", "uniform", "suit", "vest", "blouse", "sweatshirt", "hat",
                  "cap", "helmet", "scarf", "outfit", "apron", "tie", "sleeves", "sunglasses", "beanie"}
WEARER = "person wearing"


def _misspellings(word: str) -> set[str]:
    """Adjacent swaps and doubled letters (4+ letters), dropped letters (5+ letters) of a keyword."""
    out = set()
    if len(word) >= 4:
        out |= {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)}
        out |= {word[:i] + word[i] + word[i:] for i in range(len(word))}
    if len(word) >= 5:
        out |= {word[:i] + word[i + 1:] for i in range(len(word))}
    return out - {word}


# Forms that count as one of the listed keywords (a choice; the spec's lists are ReCLIP's): "-most"
# forms, superlatives of listed comparatives, and the misspellings crowd-written expressions carry.
KEYWORD_FORMS = {
    **{m: w for w in ("left", "right", "middle", "bottom", "front", "behind", "above", "below", "under", "between")
       for m in _misspellings(w)},
    "lft": "left", "lef": "left", "rite": "right", "buttom": "bottom", "bottem": "bottom", "behing": "behind",
    "inbetween": "between",
    **{f"{w}{sep}most": w for w in ("left", "right", "top", "bottom", "front", "back") for sep in ("", "-")},
    "closest": "closer", "nearest": "closer", "nearer": "closer", "furthest": "further", "farthest": "further",
    "farther": "further", "biggest": "bigger", "largest": "larger", "tiniest": "tinier",
}
for _real_word in ("font", "blow"):  # misspelling patterns that are words of their own
    KEYWORD_FORMS.pop(_real_word)


def keyword_form(word: str) -> str:
    """The keyword a word stands for ("rightmost" -> "right", "rigth" -> "right"), else the word."""
    return KEYWORD_FORMS.get(word, word)


NP_LEFT_DEPRELS = {"det", "amod", "compound", "nummod", "nmod:poss", "flat", "det:poss"}
SUBJECT_DEPRELS = {"nsubj", "nsubj:pass"}


@dataclass(frozen=True)
class ParsedExpression:
    """What the method needs from an expression.

    sentence: lower-cased, tokenized, tokens re-joined by single spaces (this is CLIP-encoded).
    noun_phrase: the phrase naming the referred object ("person wearing blue shirt" for "blue shirt").
    other_nouns: every other noun phrase, in sentence order (relation-word heads left out).
    relation: one of RELATIONS; direction: one of DIRECTIONS.
    parser: which parser produced it ("stanza", "rules", or "given" when passed in by a caller).
    """

    sentence: str
    noun_phrase: str
    other_nouns: tuple[str, ...] = ()
    relation: str = "none"
    direction: str = "none"
    parser: str = "given"

    def __post_init__(self) -> None:
        object.__setattr__(self, "other_nouns", tuple(self.other_nouns))
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")

    def to_dict(self) -> dict:
        return {"sentence": self.sentence, "noun_phrase": self.noun_phrase,
                "other_nouns": list(self.other_nouns), "relation": self.relation,
                "direction": self.direction, "parser": self.parser}


@dataclass(frozen=True)
class Word:
    """One token of a dependency tree: 0-based `head`, the root pointing to itself."""

    text: str
    upos: str
    head: int
    deprel: str


# -- the rules of spec section 5, on any dependency tree ----------------------------------------

def _is_noun(word: Word) -> bool:
    return word.upos in ("NOUN", "PROPN") or (word.upos == "PRON" and word.text == "one")


def _children(words: Sequence[Word], i: int) -> list[int]:
    return [j for j, w in enumerate(words) if w.head == i and j != i]


def _subtree(words: Sequence[Word], i: int) -> set[int]:
    out, todo = {i}, [i]
    while todo:
        for j in _children(words, todo.pop()):
            if j not in out:
                out.add(j)
                todo.append(j)
    return out


def _is_place(word: Word) -> bool:
    return keyword_form(word.text) in PLACE_WORDS


def _is_null(word: Word) -> bool:
    return keyword_form(word.text) in NULL_WORDS


def _names_object(word: Word) -> bool:
    """A noun that can be the target: not a place ("left", "top"), not a null word ("side")."""
    return not _is_place(word) and not _is_null(word)


def _splits_off(words: Sequence[Word], i: int) -> bool:
    """A noun modifying a place or null noun heads its own phrase ("person" in "person far right")."""
    head = words[words[i].head]
    return _names_object(words[i]) and (_is_place(head) or _is_null(head))


def noun_phrases(words: Sequence[Word]) -> dict[int, tuple[int, int]]:
    """Head index -> [start, end) span of its noun phrase, for every noun heading one."""
    spans = {}
    for i, w in enumerate(words):
        if not _is_noun(w):
            continue
        if w.deprel in NP_LEFT_DEPRELS and w.head > i and _is_noun(words[w.head]) and not _splits_off(words, i):
            continue  # "teddy" in "teddy bear", "man" in "man 's hat": inside another noun's phrase
        start, left = i, [j for j in _children(words, i) if j < i and words[j].deprel in NP_LEFT_DEPRELS]
        for j in left:
            if not (_is_noun(words[j]) and _splits_off(words, j)):
                start = min(start, min(k for k in _subtree(words, j) if k <= i))
        for j in left:  # a split-off noun and what hangs off it stay out of this phrase
            if _is_noun(words[j]) and _splits_off(words, j) and j >= start:
                start = max(start, max(k for k in _subtree(words, j) if k < i) + 1)
        spans[i] = (start, i + 1)
    return spans


def _earliest_head(words: Sequence[Word], classes: dict[str, set[str]]) -> str:
    best, best_head = "none", len(words) + 1
    for w in words:
        for name, keywords in classes.items():
            if keyword_form(w.text) in keywords and w.head < best_head:
                best, best_head = name, w.head
                break
    return best


def analyze(words: Sequence[Word], parser: str) -> ParsedExpression:
    """The method's parse from a dependency tree (lower-cased word texts)."""
    if not words:
        raise ValueError("empty expression")
    text = lambda span: " ".join(w.text for w in words[span[0]:span[1]])  # noqa: E731
    sentence = " ".join(w.text for w in words)
    spans = noun_phrases(words)
    root = next(i for i, w in enumerate(words) if w.head == i)

    target = None
    if root in spans and _names_object(words[root]):
        target = root
    else:
        kids = [j for j in _children(words, root) if j in spans and _names_object(words[j])]
        subjects = [j for j in kids if words[j].deprel in SUBJECT_DEPRELS]
        target = (subjects or kids or [None])[0]
    noun_phrase = text(spans[target]) if target is not None else sentence

    # by position, not by text: in "the dog behind the dog" the second "the dog" is the partner;
    # without a target phrase the whole expression is the target ("right side")
    others = [i for i in sorted(spans) if i != target and not _is_place(words[i])
              and words[i].text not in COLOUR_WORDS and not (target is None and text(spans[i]) == sentence)]
    relation = _earliest_head(words, RELATION_KEYWORDS)
    if any(_is_null(words[i]) for i in others):
        relation = "none"
    if target is not None and words[target].text in CLOTHING_WORDS and not any(
            words[j].deprel in ("nmod:poss", "det:poss") for j in _children(words, target)):
        noun_phrase = f"{WEARER} {noun_phrase}"
    return ParsedExpression(sentence, noun_phrase, tuple(text(spans[i]) for i in others), relation,
                            _earliest_head(words, DIRECTION_KEYWORDS), parser)


# -- stanza ---------------------------------------------------------------------------------------

def stanza_resources_dir() -> Path:
    """STANZA_RESOURCES_DIR, else MODEL_DIR/stanza, else ~/.cache/hybridgl/stanza."""
    from .weights import stanza_dir  # the one reading of these variables (stripped, ~ expanded)

    return stanza_dir()


def words_from_stanza(document) -> list[Word]:
    """A stanza Document -> one tree; later sentences' roots point to themselves (first root wins)."""
    words: list[Word] = []
    for sentence in document.sentences:
        offset = len(words)
        for w in sentence.words:
            head = offset + w.head - 1 if w.head else offset + w.id - 1
            words.append(Word(w.text.lower(), w.upos or "X", head, w.deprel or "dep"))
    # keep one root: a later sentence's root hangs off the first sentence's root
    roots = [i for i, w in enumerate(words) if w.head == i]
    for r in roots[1:]:
        words[r] = Word(words[r].text, words[r].upos, roots[0], "parataxis")
    return words


class StanzaParser:
    """stanza's English dependency parse; built once, never downloads at run time."""

    name = "stanza"

    def __init__(self, pipeline=None, resources_dir: str | Path | None = None, use_gpu: bool = False):
        if pipeline is None:
            import stanza

            directory = Path(resources_dir) if resources_dir else stanza_resources_dir()
            try:
                pipeline = stanza.Pipeline("en", processors="tokenize,pos,lemma,depparse", dir=str(directory),
                                           download_method=None, use_gpu=use_gpu, logging_level="WARN")
            except Exception as exc:  # stanza raises several types for missing files
                raise RuntimeError(
                    f"stanza's English models are not installed in {directory} ({exc.__class__.__name__}). "
                    "Install them with `python -m hybridgl.weights download --stanza`, "
                    "or use parser='rules'.") from exc
        self.pipeline = pipeline

    def parse_document(self, document) -> ParsedExpression:
        return analyze(words_from_stanza(document), self.name)

    def tree(self, expression: str) -> list[Word]:
        return words_from_stanza(self.pipeline(expression.lower()))

    def __call__(self, expression: str) -> ParsedExpression:
        if not expression or not expression.strip():
            raise ValueError("empty expression")
        return self.parse_document(self.pipeline(expression.lower()))


# -- rules ----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"n't|'s|'re|'m|'ll|'ve|'d|\d+(?:st|nd|rd|th)\b|\d+(?:\.\d+)?|[^\W\d_]+(?:-[^\W\d_]+)*|[^\w\s]",
                    re.UNICODE)  # "2nd" stays one token, as stanza keeps it
_DET = {"the", "a", "an", "this", "that", "these", "those", "his", "her", "its", "their", "my", "your",
        "our", "some", "any", "each", "every", "another", "both", "all", "no"}
_ADP = {"on", "in", "at", "of", "to", "from", "with", "by", "near", "next", "behind", "above", "below",
        "under", "beneath", "inside", "within", "over", "beside", "besides", "between", "among", "across",
        "against", "along", "around", "into", "onto", "off", "through", "toward", "towards", "underneath",
        "without", "upon", "atop", "like", "for", "about", "beyond", "past", "via", "than", "outside"}
_AUX = {"is", "are", "was", "were", "be", "been", "being", "am", "'s", "'re", "'m", "has", "have", "had",
        "does", "do", "did", "can", "could", "will", "would", "should", "may", "might"}
_CCONJ = {"and", "or", "but", "nor", "&"}
_PRON = {"who", "whom", "whose", "which", "what", "he", "she", "it", "they", "him", "them", "i", "you",
         "we", "me", "us", "one", "ones", "someone", "something", "himself", "herself", "itself"}
_ADV = {"very", "most", "more", "less", "least", "slightly", "partially", "partly", "almost", "mostly",
        "just", "only", "also", "not", "n't", "too", "so", "really", "fully", "half-way", "there", "here",
        "closest", "furthest", "farthest", "far", "away", "up", "down", "out", "back"}
_NUM = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"}
_ADJ = {
    # colours and looks
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "dark", "light", "bright", "pale", "golden", "silver", "striped", "plaid", "spotted", "colorful",
    "blond", "blonde", "tan", "beige", "maroon", "navy", "teal",
    # size, position, order
    "big", "bigger", "biggest", "large", "larger", "largest", "small", "smaller", "smallest", "little",
    "tiny", "tinier", "tiniest", "tall", "taller", "tallest", "short", "shorter", "shortest", "long",
    "longer", "huge", "giant", "closer", "closest", "further", "furthest", "farther", "farthest", "nearest",
    "near", "far", "first", "second", "third", "fourth", "fifth", "last", "next", "other", "only", "same",
    "upper", "lower", "top", "bottom", "left", "right", "middle", "center", "central", "front", "back",
    "rear", "leftmost", "rightmost", "topmost", "half", "full", "empty", "whole", "partial", "visible",
    # people and things
    "old", "older", "young", "younger", "new", "baby", "adult", "male", "female", "fat", "thin", "skinny",
    "bald", "wooden", "metal", "plastic", "glass", "open", "closed", "wet", "dry", "hot", "cold", "clean",
    "dirty", "cut", "sliced", "whole", "standing", "sitting", "smiling",
}
_VERBS = {"holding", "wearing", "sitting", "standing", "looking", "walking", "riding", "eating", "playing",
          "carrying", "running", "lying", "laying", "facing", "touching", "leaning", "hitting", "swinging",
          "throwing", "catching", "talking", "watching", "reaching", "bending", "drinking", "using",
          "pulling", "pushing", "covered", "filled", "topped", "parked", "seated", "cut", "hidden", "shown",
          "has", "have", "holds", "wears", "sits", "stands", "looks", "rides", "eats", "carries", "faces",
          "leans", "smiling", "laughing", "pointing", "jumping", "flying", "swimming", "grazing", "waiting"}
_ING_NOUNS = {"thing", "something", "nothing", "anything", "building", "ceiling", "clothing", "painting",
              "king", "ring", "string", "wing", "spring", "evening", "morning", "icing", "frosting",
              "stuffing", "topping", "dressing", "railing", "awning", "pudding", "sing", "swing", "sling",
              "ding", "ping", "bring", "sibling", "seedling", "dumpling", "wedding", "bedding", "ping-pong"}
_NOUNY_ADJ = {"left", "right", "middle", "top", "bottom", "front", "back", "center", "half"}
_ORDINAL = re.compile(r"\d+(?:st|nd|rd|th)|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth")


def tokenize(expression: str) -> list[str]:
    """Lower-cased tokens, punctuation and clitics ('s, n't) split off as stanza and spaCy do."""
    text = expression.lower().replace("\u2019", "'")
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    return _TOKEN.findall(text)


def _tag(tokens: list[str]) -> list[str]:
    """A universal POS tag per token from the lexicon and word shape; unknown words are nouns."""
    tags = []
    for t in map(keyword_form, tokens):  # a misspelt keyword is tagged as the keyword
        if not any(c.isalnum() for c in t):
            tags.append("PUNCT")
        elif t == "one":
            tags.append("PRON")
        elif t in _DET:
            tags.append("DET")
        elif t in _CCONJ:
            tags.append("CCONJ")
        elif t in _AUX:
            tags.append("AUX")
        elif t in _PRON:
            tags.append("PRON")
        elif t in _ADP:
            tags.append("ADP")
        elif _ORDINAL.fullmatch(t):
            tags.append("ADJ")
        elif t in _NUM or t[0].isdigit():
            tags.append("NUM")
        elif t in _VERBS or (t.endswith("ing") and len(t) > 5 and t not in _ING_NOUNS):
            tags.append("VERB")
        elif t in _ADJ or t.endswith("est") and len(t) > 5 or t.endswith("most") and len(t) > 4 and t != "almost":
            tags.append("ADJ")
        elif t in _ADV or (t.endswith("ly") and len(t) > 4):
            tags.append("ADV")
        else:
            tags.append("NOUN")
    # words that are adjectives before a noun and nouns elsewhere ("left guy" / "on the left")
    for i, t in enumerate(map(keyword_form, tokens)):
        if tags[i] == "ADJ" and t in _NOUNY_ADJ:
            nxt = next((tags[j] for j in range(i + 1, len(tokens)) if tags[j] != "ADJ"), None)
            tags[i] = "ADJ" if nxt in ("NOUN", "PRON") and tokens[i + 1] != "of" else "NOUN"
        if t == "front" and i > 0 and tokens[i - 1] == "in":
            tags[i] = "NOUN"
        if t in ("up", "down", "back") and i > 0 and tags[i - 1] == "DET":
            tags[i] = "NOUN"
    return tags


def _rule_tree(tokens: list[str]) -> list[Word]:
    """An approximate UD tree: noun chunks, prepositions as case markers of the next chunk, chunks
    attached to the previous chunk (or to a participle in between), copulas making the predicate root."""
    tags = _tag(tokens)
    n = len(tokens)
    # noun chunks: [DET] (ADV|ADJ|NUM|NOUN|'s)* head, the head being the last noun of the run
    chunk_of = [-1] * n
    chunks: list[tuple[int, int, int]] = []  # (start, end, head)
    i = 0
    while i < n:
        if tags[i] in ("DET", "ADJ", "NUM", "NOUN", "ADV", "PRON") and not (tags[i] == "PRON" and tokens[i] != "one"):
            j = i + 1 if tags[i] in ("DET",) else i
            while j < n and (tags[j] in ("ADV", "ADJ", "NUM", "NOUN") or (tags[j] == "PRON" and tokens[j] == "one")
                             or (tokens[j] == "'s" and j > i)):
                if tags[j] == "PRON":
                    j += 1
                    break
                j += 1
            nouns = [k for k in range(i, j) if tags[k] == "NOUN" or (tags[k] == "PRON" and tokens[k] == "one")]
            # a place after an object noun is its own phrase: "person | far right", "chair | bottom left"
            objects = [k for k in nouns if keyword_form(tokens[k]) not in PLACE_WORDS]
            place = next((k for k in range(i, j) if keyword_form(tokens[k]) in PLACE_WORDS
                          and objects and objects[0] < k), None)
            if place is not None:
                nouns = [k for k in objects if k < place][-1:]
            if nouns:
                end = nouns[-1] + 1
                chunks.append((i, end, nouns[-1]))
                for k in range(i, end):
                    chunk_of[k] = len(chunks) - 1
                i = end
                continue
        i += 1

    heads = list(range(n))
    deprels = ["dep"] * n
    upos = ["PART" if t == "'s" else tag for t, tag in zip(tokens, tags)]
    for start, end, head in chunks:
        for k in range(start, end):
            if k != head:
                heads[k] = head
                deprels[k] = "det" if tags[k] == "DET" else "nummod" if tags[k] == "NUM" else \
                    "advmod" if tags[k] == "ADV" else "case" if tokens[k] == "'s" else \
                    "compound" if tags[k] == "NOUN" else "amod"
        for k in range(start, end):  # "the man 's hat": the possessor is a modifier of the last head
            if tokens[k] == "'s" and k > start and chunk_of[k - 1] == chunk_of[k]:
                deprels[k - 1] = "nmod:poss"
            if tags[k] == "ADV" and k + 1 < head and tags[k + 1] in ("ADJ", "NOUN"):
                heads[k] = k + 1  # "very" in "very left chair" modifies "left"

    # the root: the first chunk, unless a copula makes the predicate after it the root
    first = chunks[0][2] if chunks else 0
    root = first
    cop = next((k for k in range(n) if tags[k] == "AUX" and chunks and k > chunks[0][2]), None)
    if cop is not None:
        after = [c for c in chunks if c[0] > cop]
        pred = after[0][2] if after else next((k for k in range(cop + 1, n) if tags[k] in ("ADJ", "ADP")), None)
        if pred is not None:
            root = pred
            heads[first], deprels[first] = root, "nsubj"
            heads[cop], deprels[cop] = root, "cop"
    heads[root], deprels[root] = root, "root"

    previous_head = None
    for start, end, head in chunks:
        if head not in (root, first) or (head == first and head != root and deprels[head] != "nsubj"):
            verbs = [k for k in range(previous_head + 1 if previous_head is not None else 0, start)
                     if tags[k] == "VERB"] if previous_head is not None else []
            heads[head] = verbs[-1] if verbs else (previous_head if previous_head is not None else root)
            deprels[head] = "obj" if verbs else "nmod"
        previous_head = head
    for k in range(n):
        if chunk_of[k] >= 0 or k == root or deprels[k] in ("cop", "nsubj"):
            continue
        if tags[k] == "ADP":  # a preposition marks the chunk that follows it
            nxt = next((c[2] for c in chunks if c[0] > k), None)
            heads[k], deprels[k] = (nxt, "case") if nxt is not None else (root, "dep")
        elif tags[k] == "VERB":  # a participle modifies the chunk before it
            prev = [c[2] for c in chunks if c[2] < k]
            heads[k], deprels[k] = (prev[-1], "acl") if prev else (root, "dep")
        else:
            heads[k], deprels[k] = root, "punct" if tags[k] == "PUNCT" else "dep"
    return [Word(t, u, h, d) for t, u, h, d in zip(tokens, upos, heads, deprels)]


class RuleParser:
    """No models: tokenizer, lexicon and attachment heuristics (see the module docstring for limits)."""

    name = "rules"

    def tree(self, expression: str) -> list[Word]:
        return _rule_tree(tokenize(expression))

    def __call__(self, expression: str) -> ParsedExpression:
        if not expression or not expression.strip():
            raise ValueError("empty expression")
        tokens = tokenize(expression)
        if not tokens:
            raise ValueError("empty expression")
        return analyze(_rule_tree(tokens), self.name)


def make_parser(name: str = "auto", resources_dir: str | Path | None = None) -> Callable[[str], ParsedExpression]:
    """"stanza" (its models must be installed), "rules", or "auto" (stanza when installed, else rules)."""
    if name == "rules":
        log.info("expression parser: rules")
        return RuleParser()
    if name == "stanza":
        parser = StanzaParser(resources_dir=resources_dir)
        log.info("expression parser: stanza")
        return parser
    if name == "auto":
        try:
            parser = StanzaParser(resources_dir=resources_dir)
        except RuntimeError as exc:
            log.warning("stanza unavailable, using the rule-based parser instead: %s", exc)
            return RuleParser()
        log.info("expression parser: stanza")
        return parser
    raise ValueError(f"unknown parser {name!r}; expected stanza, rules or auto")


def parse_expression(expression: str, parser: str | Callable[[str], ParsedExpression] = "auto") -> ParsedExpression:
    """Parse one expression with a parser name or object."""
    return (make_parser(parser) if isinstance(parser, str) else parser)(expression)
