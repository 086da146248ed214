"""Terse RefCOCO-style expressions: both parsers give the target, relation, direction and other nouns.

Every row: the form, the expression (written in the RefCOCO style for this table, not taken from a
dataset), the dependency tree stanza's English model gives it, written by hand in UD EWT conventions
("word/UPOS/head/deprel", heads 1-based, 0 = root), and the expected parse. The stanza path reads the
tree; the rule parser reads the text; both must give the expected parse, so they agree on every row.
Where stanza could plausibly give another tree for the same text, ALTERNATIVE_TREES checks that the
parse does not depend on which.
"""
from __future__ import annotations

from collections import Counter

import pytest
from stanza.models.common.doc import Document

from hybridgl.parsing import KEYWORD_FORMS, PLACE_WORDS, RuleParser, StanzaParser, keyword_form, tokenize

WEARS = "person wearing"

# (form, expression, tree, noun_phrase, other_nouns, relation, direction)
TERSE = [
    # a direction after the noun, with or without an intensifier: the noun is the target
    ("after-noun", "person far right", "person/NOUN/0/root far/ADV/3/advmod right/ADV/1/advmod",
     "person", (), "right", "right"),
    ("after-noun", "guy far left", "guy/NOUN/0/root far/ADV/3/advmod left/ADV/1/advmod", "guy", (), "left", "left"),
    ("after-noun", "woman very right", "woman/NOUN/0/root very/ADV/3/advmod right/ADV/1/advmod",
     "woman", (), "right", "right"),
    ("after-noun", "zebra right", "zebra/NOUN/0/root right/ADV/1/advmod", "zebra", (), "right", "right"),
    ("after-noun", "elephant left", "elephant/NOUN/0/root left/VERB/1/acl", "elephant", (), "left", "left"),
    ("after-noun", "chair bottom left",
     "chair/NOUN/0/root bottom/ADJ/3/amod left/NOUN/1/nmod:npmod", "chair", (), "left", "left"),
    ("after-noun", "sheep top right",
     "sheep/NOUN/0/root top/ADJ/3/amod right/NOUN/1/nmod:npmod", "sheep", (), "right", "right"),
    ("after-noun", "cat in far right",
     "cat/NOUN/0/root in/ADP/4/case far/ADJ/4/amod right/NOUN/1/nmod", "cat", (), "right", "right"),
    ("after-noun", "man at far left",
     "man/NOUN/0/root at/ADP/4/case far/ADJ/4/amod left/NOUN/1/nmod", "man", (), "left", "left"),
    ("after-noun", "bus on the far right",
     "bus/NOUN/0/root on/ADP/5/case the/DET/5/det far/ADJ/5/amod right/NOUN/1/nmod", "bus", (), "right", "right"),
    ("after-noun", "kid far left of picture",
     "kid/NOUN/0/root far/ADV/3/advmod left/ADV/1/advmod of/ADP/5/case picture/NOUN/3/obl",
     "kid", ("picture",), "none", "left"),  # a null word cancels the relation, not the direction
    ("after-noun", "broccoli right side",
     "broccoli/NOUN/0/root right/ADJ/3/amod side/NOUN/1/nmod:npmod", "broccoli", ("right side",), "none", "right"),
    ("after-noun", "plate far left", "plate/NOUN/0/root far/ADV/3/advmod left/ADV/1/advmod",
     "plate", (), "left", "left"),
    ("after-noun", "horse middle", "horse/NOUN/2/compound middle/NOUN/0/root", "horse", (), "none", "middle"),
    ("after-noun", "donut top", "donut/NOUN/2/compound top/NOUN/0/root", "donut", (), "up", "up"),
    ("after-noun", "pink dress far left",
     "pink/ADJ/2/amod dress/NOUN/0/root far/ADV/4/advmod left/ADV/2/advmod",
     f"{WEARS} pink dress", (), "left", "left"),
    ("after-noun", "white shirt guy far left",
     "white/ADJ/2/amod shirt/NOUN/3/compound guy/NOUN/0/root far/ADV/5/advmod left/ADV/3/advmod",
     "white shirt guy", (), "left", "left"),
    ("after-noun", "cup left of plate",
     "cup/NOUN/0/root left/ADV/1/advmod of/ADP/4/case plate/NOUN/2/obl", "cup", ("plate",), "left", "left"),
    # a direction before the noun, with "far" or "very": the modifiers stay in the phrase (spec)
    ("before-noun", "far left guy", "far/ADV/2/advmod left/ADJ/3/amod guy/NOUN/0/root",
     "far left guy", (), "left", "left"),
    ("before-noun", "far right person", "far/ADV/2/advmod right/ADJ/3/amod person/NOUN/0/root",
     "far right person", (), "right", "right"),
    ("before-noun", "very left chair", "very/ADV/2/advmod left/ADJ/3/amod chair/NOUN/0/root",
     "very left chair", (), "left", "left"),
    ("before-noun", "very right banana", "very/ADV/2/advmod right/ADJ/3/amod banana/NOUN/0/root",
     "very right banana", (), "right", "right"),
    ("before-noun", "right girl", "right/ADJ/2/amod girl/NOUN/0/root", "right girl", (), "right", "right"),
    ("before-noun", "left plate", "left/ADJ/2/amod plate/NOUN/0/root", "left plate", (), "left", "left"),
    ("before-noun", "the far left cow", "the/DET/4/det far/ADV/3/advmod left/ADJ/4/amod cow/NOUN/0/root",
     "the far left cow", (), "left", "left"),
    ("before-noun", "left side guy", "left/ADJ/2/amod side/NOUN/3/compound guy/NOUN/0/root",
     "left side guy", (), "left", "left"),
    ("before-noun", "right front car", "right/ADJ/3/amod front/ADJ/3/amod car/NOUN/0/root",
     "right front car", (), "right", "right"),  # same head: the first keyword wins (spec)
    ("before-noun", "front left bike", "front/ADJ/3/amod left/ADJ/3/amod bike/NOUN/0/root",
     "front left bike", (), "down", "left"),
    ("before-noun", "back right table", "back/ADJ/3/amod right/ADJ/3/amod table/NOUN/0/root",
     "back right table", (), "up", "right"),
    ("before-noun", "left white car", "left/ADJ/3/amod white/ADJ/3/amod car/NOUN/0/root",
     "left white car", (), "left", "left"),
    ("before-noun", "middle man", "middle/ADJ/2/amod man/NOUN/0/root", "middle man", (), "none", "middle"),
    ("before-noun", "center pizza", "center/NOUN/2/compound pizza/NOUN/0/root", "center pizza", (), "none", "none"),
    ("before-noun", "right bear", "right/ADJ/2/amod bear/NOUN/0/root", "right bear", (), "right", "right"),
    ("before-noun", "left most sheep", "left/ADJ/3/amod most/ADV/1/advmod sheep/NOUN/0/root",
     "left most sheep", (), "left", "left"),
    ("before-noun", "right most zebra", "right/ADJ/3/amod most/ADV/1/advmod zebra/NOUN/0/root",
     "right most zebra", (), "right", "right"),
    # "-most" words count as their keyword (a choice: they are not in ReCLIP's lists)
    ("-most", "rightmost zebra", "rightmost/ADJ/2/amod zebra/NOUN/0/root", "rightmost zebra", (), "right", "right"),
    ("-most", "leftmost person", "leftmost/ADJ/2/amod person/NOUN/0/root", "leftmost person", (), "left", "left"),
    ("-most", "leftmost", "leftmost/ADJ/0/root", "leftmost", (), "left", "left"),
    ("-most", "the rightmost one", "the/DET/3/det rightmost/ADJ/3/amod one/NOUN/0/root",
     "the rightmost one", (), "right", "right"),
    ("-most", "topmost donut", "topmost/ADJ/2/amod donut/NOUN/0/root", "topmost donut", (), "up", "up"),
    ("-most", "bottommost cake", "bottommost/ADJ/2/amod cake/NOUN/0/root", "bottommost cake", (), "none", "down"),
    ("-most", "horse rightmost", "horse/NOUN/0/root rightmost/ADJ/1/amod", "horse", (), "right", "right"),
    ("-most", "guy leftmost", "guy/NOUN/0/root leftmost/ADJ/1/amod", "guy", (), "left", "left"),
    ("-most", "frontmost car", "frontmost/ADJ/2/amod car/NOUN/0/root", "frontmost car", (), "down", "none"),
    ("-most", "front most car", "front/ADJ/3/amod most/ADV/1/advmod car/NOUN/0/root",
     "front most car", (), "down", "none"),
    # ordinals: with a noun it heads the phrase; without one the expression stands in
    ("ordinal", "second from left", "second/ADJ/0/root from/ADP/3/case left/NOUN/1/obl",
     "second from left", (), "left", "left"),
    ("ordinal", "2nd from left", "2nd/ADJ/0/root from/ADP/3/case left/NOUN/1/obl", "2nd from left", (), "left", "left"),
    ("ordinal", "2nd from right", "2nd/ADJ/0/root from/ADP/3/case right/NOUN/1/obl",
     "2nd from right", (), "right", "right"),
    ("ordinal", "third from left", "third/ADJ/0/root from/ADP/3/case left/NOUN/1/obl",
     "third from left", (), "left", "left"),
    ("ordinal", "3rd from right", "3rd/ADJ/0/root from/ADP/3/case right/NOUN/1/obl",
     "3rd from right", (), "right", "right"),
    ("ordinal", "4th from left", "4th/ADJ/0/root from/ADP/3/case left/NOUN/1/obl", "4th from left", (), "left", "left"),
    ("ordinal", "second from the right", "second/ADJ/0/root from/ADP/4/case the/DET/4/det right/NOUN/1/obl",
     "second from the right", (), "right", "right"),
    ("ordinal", "third one", "third/ADJ/2/amod one/NOUN/0/root", "third one", (), "none", "none"),
    ("ordinal", "second one from left",
     "second/ADJ/2/amod one/NOUN/0/root from/ADP/4/case left/NOUN/2/nmod", "second one", (), "left", "left"),
    ("ordinal", "2nd guy from right",
     "2nd/ADJ/2/amod guy/NOUN/0/root from/ADP/4/case right/NOUN/2/nmod", "2nd guy", (), "right", "right"),
    ("ordinal", "first person on left",
     "first/ADJ/2/amod person/NOUN/0/root on/ADP/4/case left/NOUN/2/nmod", "first person", (), "left", "left"),
    ("ordinal", "second zebra from right",
     "second/ADJ/2/amod zebra/NOUN/0/root from/ADP/4/case right/NOUN/2/nmod", "second zebra", (), "right", "right"),
    ("ordinal", "third person from the left",
     "third/ADJ/2/amod person/NOUN/0/root from/ADP/5/case the/DET/5/det left/NOUN/2/nmod",
     "third person", (), "left", "left"),
    ("ordinal", "1st bike on left",
     "1st/ADJ/2/amod bike/NOUN/0/root on/ADP/4/case left/NOUN/2/nmod", "1st bike", (), "left", "left"),
    ("ordinal", "second from top", "second/ADJ/0/root from/ADP/3/case top/NOUN/1/obl",
     "second from top", (), "up", "up"),
    ("ordinal", "2nd from bottom", "2nd/ADJ/0/root from/ADP/3/case bottom/NOUN/1/obl",
     "2nd from bottom", (), "none", "down"),
    ("ordinal", "third cake", "third/ADJ/2/amod cake/NOUN/0/root", "third cake", (), "none", "none"),
    # corners: two keywords on one head, the first wins each class (spec); after the noun the
    # horizontal word hangs off the noun and the vertical one off it, so the horizontal one wins
    ("corner", "top left donut", "top/ADJ/3/amod left/ADJ/3/amod donut/NOUN/0/root",
     "top left donut", (), "up", "up"),
    ("corner", "bottom right pizza", "bottom/ADJ/3/amod right/ADJ/3/amod pizza/NOUN/0/root",
     "bottom right pizza", (), "right", "down"),
    ("corner", "top right sandwich", "top/ADJ/3/amod right/ADJ/3/amod sandwich/NOUN/0/root",
     "top right sandwich", (), "up", "up"),
    ("corner", "bottom left", "bottom/ADJ/2/amod left/NOUN/0/root", "bottom left", (), "left", "down"),
    ("corner", "top right", "top/ADJ/2/amod right/NOUN/0/root", "top right", (), "up", "up"),
    ("corner", "donut top left", "donut/NOUN/0/root top/ADJ/3/amod left/NOUN/1/nmod:npmod",
     "donut", (), "left", "left"),
    ("corner", "pizza in bottom right corner",
     "pizza/NOUN/0/root in/ADP/5/case bottom/ADJ/5/amod right/ADJ/5/amod corner/NOUN/1/nmod",
     "pizza", (), "right", "down"),
    ("corner", "the top left cake", "the/DET/4/det top/ADJ/4/amod left/ADJ/4/amod cake/NOUN/0/root",
     "the top left cake", (), "up", "up"),
    ("corner", "bottom right one", "bottom/ADJ/3/amod right/ADJ/3/amod one/NOUN/0/root",
     "bottom right one", (), "right", "down"),
    ("corner", "upper left zebra", "upper/ADJ/3/amod left/ADJ/3/amod zebra/NOUN/0/root",
     "upper left zebra", (), "left", "left"),
    ("corner", "lower right chair", "lower/ADJ/3/amod right/ADJ/3/amod chair/NOUN/0/root",
     "lower right chair", (), "right", "right"),
    ("corner", "top left corner", "top/ADJ/3/amod left/ADJ/3/amod corner/NOUN/0/root",
     "top left corner", (), "up", "up"),
    ("corner", "bowl bottom right", "bowl/NOUN/0/root bottom/ADJ/3/amod right/NOUN/1/nmod:npmod",
     "bowl", (), "right", "right"),
    # front / back / behind (ReCLIP's down / up) and closest / farthest (as closer / further: big / small)
    ("front-back", "front bike", "front/ADJ/2/amod bike/NOUN/0/root", "front bike", (), "down", "none"),
    ("front-back", "bike in front", "bike/NOUN/0/root in/ADP/3/case front/NOUN/1/nmod", "bike", (), "down", "none"),
    ("front-back", "guy in back", "guy/NOUN/0/root in/ADP/3/case back/NOUN/1/nmod", "guy", (), "up", "none"),
    ("front-back", "back guy", "back/ADJ/2/amod guy/NOUN/0/root", "back guy", (), "up", "none"),
    ("front-back", "person behind", "person/NOUN/0/root behind/ADV/1/advmod", "person", (), "up", "none"),
    ("front-back", "sheep behind fence", "sheep/NOUN/0/root behind/ADP/3/case fence/NOUN/1/nmod",
     "sheep", ("fence",), "up", "none"),
    ("front-back", "car in the back", "car/NOUN/0/root in/ADP/4/case the/DET/4/det back/NOUN/1/nmod",
     "car", (), "up", "none"),
    ("front-back", "person in front of bus",
     "person/NOUN/0/root in/ADP/3/case front/NOUN/1/nmod of/ADP/5/case bus/NOUN/3/nmod",
     "person", ("bus",), "down", "none"),
    ("front-back", "kid in the very front",
     "kid/NOUN/0/root in/ADP/5/case the/DET/5/det very/ADJ/5/amod front/NOUN/1/nmod", "kid", (), "down", "none"),
    ("front-back", "guy in back row",
     "guy/NOUN/0/root in/ADP/4/case back/ADJ/4/amod row/NOUN/1/nmod", "guy", (), "up", "none"),
    ("front-back", "back one", "back/ADJ/2/amod one/NOUN/0/root", "back one", (), "up", "none"),
    ("front-back", "front", "front/NOUN/0/root", "front", (), "down", "none"),
    ("front-back", "car behind truck", "car/NOUN/0/root behind/ADP/3/case truck/NOUN/1/nmod",
     "car", ("truck",), "up", "none"),
    ("front-back", "umpire behind catcher", "umpire/NOUN/0/root behind/ADP/3/case catcher/NOUN/1/nmod",
     "umpire", ("catcher",), "up", "none"),
    ("closest-farthest", "closest cow", "closest/ADJ/2/amod cow/NOUN/0/root", "closest cow", (), "big", "none"),
    ("closest-farthest", "farthest zebra", "farthest/ADJ/2/amod zebra/NOUN/0/root",
     "farthest zebra", (), "small", "none"),
    ("closest-farthest", "furthest person", "furthest/ADJ/2/amod person/NOUN/0/root",
     "furthest person", (), "small", "none"),
    ("closest-farthest", "nearest elephant", "nearest/ADJ/2/amod elephant/NOUN/0/root",
     "nearest elephant", (), "big", "none"),
    ("closest-farthest", "closest one", "closest/ADJ/2/amod one/NOUN/0/root", "closest one", (), "big", "none"),
    ("closest-farthest", "the closer giraffe", "the/DET/3/det closer/ADJ/3/amod giraffe/NOUN/0/root",
     "the closer giraffe", (), "big", "none"),
    ("closest-farthest", "further bed", "further/ADJ/2/amod bed/NOUN/0/root", "further bed", (), "small", "none"),
    ("closest-farthest", "chair closest to camera",
     "chair/NOUN/0/root closest/ADJ/1/amod to/ADP/4/case camera/NOUN/2/obl", "chair", ("camera",), "big", "none"),
    ("closest-farthest", "farther giraffe", "farther/ADJ/2/amod giraffe/NOUN/0/root",
     "farther giraffe", (), "small", "none"),
    ("closest-farthest", "biggest elephant", "biggest/ADJ/2/amod elephant/NOUN/0/root",
     "biggest elephant", (), "big", "none"),
    ("closest-farthest", "smallest bear", "smallest/ADJ/2/amod bear/NOUN/0/root",
     "smallest bear", (), "small", "none"),
    # clothes or a colour only: the target is the wearer (a choice, see hybridgl.parsing)
    ("clothes-colour", "blue shirt", "blue/ADJ/2/amod shirt/NOUN/0/root", f"{WEARS} blue shirt", (), "none", "none"),
    ("clothes-colour", "red jacket", "red/ADJ/2/amod jacket/NOUN/0/root", f"{WEARS} red jacket", (), "none", "none"),
    ("clothes-colour", "black hat", "black/ADJ/2/amod hat/NOUN/0/root", f"{WEARS} black hat", (), "none", "none"),
    ("clothes-colour", "yellow jersey", "yellow/ADJ/2/amod jersey/NOUN/0/root",
     f"{WEARS} yellow jersey", (), "none", "none"),
    ("clothes-colour", "grey hoodie", "grey/ADJ/2/amod hoodie/NOUN/0/root", f"{WEARS} grey hoodie", (), "none", "none"),
    ("clothes-colour", "striped shirt on left",
     "striped/ADJ/2/amod shirt/NOUN/0/root on/ADP/4/case left/NOUN/2/nmod", f"{WEARS} striped shirt", (), "left",
     "left"),
    ("clothes-colour", "white shirt guy", "white/ADJ/2/amod shirt/NOUN/3/compound guy/NOUN/0/root",
     "white shirt guy", (), "none", "none"),
    ("clothes-colour", "guy in blue shirt",
     "guy/NOUN/0/root in/ADP/4/case blue/ADJ/4/amod shirt/NOUN/1/nmod", "guy", ("blue shirt",), "none", "none"),
    ("clothes-colour", "woman in black dress",
     "woman/NOUN/0/root in/ADP/4/case black/ADJ/4/amod dress/NOUN/1/nmod", "woman", ("black dress",), "none", "none"),
    ("clothes-colour", "guy in white", "guy/NOUN/0/root in/ADP/3/case white/NOUN/1/nmod", "guy", (), "none", "none"),
    ("clothes-colour", "girl in pink", "girl/NOUN/0/root in/ADP/3/case pink/NOUN/1/nmod", "girl", (), "none", "none"),
    ("clothes-colour", "the one in red", "the/DET/2/det one/NOUN/0/root in/ADP/4/case red/NOUN/2/nmod",
     "the one", (), "none", "none"),
    ("clothes-colour", "man in red on right",
     "man/NOUN/0/root in/ADP/3/case red/NOUN/1/nmod on/ADP/5/case right/NOUN/1/nmod", "man", (), "right", "right"),
    ("clothes-colour", "guy wearing black", "guy/NOUN/0/root wearing/VERB/1/acl black/NOUN/2/obj",
     "guy", (), "none", "none"),
    ("clothes-colour", "blue", "blue/ADJ/0/root", "blue", (), "none", "none"),
    ("clothes-colour", "white", "white/ADJ/0/root", "white", (), "none", "none"),
    ("clothes-colour", "green one", "green/ADJ/2/amod one/NOUN/0/root", "green one", (), "none", "none"),
    ("clothes-colour", "kid wearing red hat",
     "kid/NOUN/0/root wearing/VERB/1/acl red/ADJ/4/amod hat/NOUN/2/obj", "kid", ("red hat",), "none", "none"),
    ("clothes-colour", "man 's hat", "man/NOUN/3/nmod:poss 's/PART/1/case hat/NOUN/0/root",
     "man 's hat", (), "none", "none"),  # a named owner: the hat itself is meant
    # no noun at all: the best stand-in is the root's phrase ("one") or the whole expression (spec)
    ("no-noun", "left", "left/VERB/0/root", "left", (), "left", "left"),
    ("no-noun", "right", "right/ADJ/0/root", "right", (), "right", "right"),
    ("no-noun", "middle", "middle/ADJ/0/root", "middle", (), "none", "middle"),
    ("no-noun", "middle one", "middle/ADJ/2/amod one/NOUN/0/root", "middle one", (), "none", "middle"),
    ("no-noun", "the right one", "the/DET/3/det right/ADJ/3/amod one/NOUN/0/root", "the right one", (), "right",
     "right"),
    ("no-noun", "the left one", "the/DET/3/det left/ADJ/3/amod one/NOUN/0/root", "the left one", (), "left", "left"),
    ("no-noun", "left one", "left/ADJ/2/amod one/NOUN/0/root", "left one", (), "left", "left"),
    ("no-noun", "very left", "very/ADV/2/advmod left/ADJ/0/root", "very left", (), "left", "left"),
    ("no-noun", "far right", "far/ADV/2/advmod right/ADV/0/root", "far right", (), "right", "right"),
    ("no-noun", "far left", "far/ADV/2/advmod left/ADV/0/root", "far left", (), "left", "left"),
    ("no-noun", "right side", "right/ADJ/2/amod side/NOUN/0/root", "right side", (), "right", "right"),
    ("no-noun", "top", "top/NOUN/0/root", "top", (), "up", "up"),
    ("no-noun", "bottom", "bottom/NOUN/0/root", "bottom", (), "none", "down"),
    ("no-noun", "in front", "in/ADP/2/case front/NOUN/0/root", "in front", (), "down", "none"),
    ("no-noun", "on the left", "on/ADP/3/case the/DET/3/det left/NOUN/0/root", "on the left", (), "left", "left"),
    ("no-noun", "the middle", "the/DET/2/det middle/NOUN/0/root", "the middle", (), "none", "middle"),
    ("no-noun", "center", "center/NOUN/0/root", "center", (), "none", "none"),
    ("no-noun", "closest", "closest/ADJ/0/root", "closest", (), "big", "none"),
    ("no-noun", "middle guy", "middle/ADJ/2/amod guy/NOUN/0/root", "middle guy", (), "none", "middle"),
    # RefCOCO's misspellings of keywords count as the keyword; the sentence keeps the text as typed
    ("typo", "guy on rigth", "guy/NOUN/0/root on/ADP/3/case rigth/NOUN/1/nmod", "guy", (), "right", "right"),
    ("typo", "rigth guy", "rigth/ADJ/2/amod guy/NOUN/0/root", "rigth guy", (), "right", "right"),
    ("typo", "lft girl", "lft/NOUN/2/compound girl/NOUN/0/root", "lft girl", (), "left", "left"),
    ("typo", "midle chair", "midle/ADJ/2/amod chair/NOUN/0/root", "midle chair", (), "none", "middle"),
    ("typo", "botom left pizza", "botom/ADJ/3/amod left/ADJ/3/amod pizza/NOUN/0/root",
     "botom left pizza", (), "left", "down"),
    ("typo", "man in fornt", "man/NOUN/0/root in/ADP/3/case fornt/NOUN/1/nmod", "man", (), "down", "none"),
    ("typo", "girl behing boy", "girl/NOUN/0/root behing/VERB/1/acl boy/NOUN/2/obj", "girl", ("boy",), "up", "none"),
    ("typo", "persn on left", "persn/NOUN/0/root on/ADP/3/case left/NOUN/1/nmod", "persn", (), "left", "left"),
    ("typo", "man rihgt", "man/NOUN/0/root rihgt/NOUN/1/nmod:npmod", "man", (), "right", "right"),
    ("typo", "leftt horse", "leftt/ADJ/2/amod horse/NOUN/0/root", "leftt horse", (), "left", "left"),
    ("typo", "womn in middel", "womn/NOUN/0/root in/ADP/3/case middel/NOUN/1/nmod", "womn", (), "none", "middle"),
    ("typo", "guy in bottem right",
     "guy/NOUN/0/root in/ADP/4/case bottem/ADJ/4/amod right/NOUN/1/nmod", "guy", (), "right", "right"),
    ("typo", "rite side guy", "rite/ADJ/2/amod side/NOUN/3/compound guy/NOUN/0/root",
     "rite side guy", (), "right", "right"),
    ("typo", "lef elephant", "lef/ADJ/2/amod elephant/NOUN/0/root", "lef elephant", (), "left", "left"),
    ("typo", "cat undr table", "cat/NOUN/0/root undr/ADP/3/case table/NOUN/1/nmod", "cat", ("table",), "down",
     "down"),
    ("typo", "dog inbetween cats", "dog/NOUN/0/root inbetween/ADP/3/case cats/NOUN/1/nmod",
     "dog", ("cats",), "none", "middle"),
    ("typo", "guy on the rght", "guy/NOUN/0/root on/ADP/4/case the/DET/4/det rght/NOUN/1/nmod",
     "guy", (), "right", "right"),
    # missing articles and short relations
    ("no-article", "dog under table", "dog/NOUN/0/root under/ADP/3/case table/NOUN/1/nmod",
     "dog", ("table",), "down", "down"),
    ("no-article", "girl holding racket", "girl/NOUN/0/root holding/VERB/1/acl racket/NOUN/2/obj",
     "girl", ("racket",), "none", "none"),
    ("no-article", "man with umbrella", "man/NOUN/0/root with/ADP/3/case umbrella/NOUN/1/nmod",
     "man", ("umbrella",), "none", "none"),
    ("no-article", "pizza above plate", "pizza/NOUN/0/root above/ADP/3/case plate/NOUN/1/nmod",
     "pizza", ("plate",), "up", "up"),
    ("no-article", "bigger elephant", "bigger/ADJ/2/amod elephant/NOUN/0/root", "bigger elephant", (), "big", "none"),
    ("no-article", "smaller dog on right",
     "smaller/ADJ/2/amod dog/NOUN/0/root on/ADP/4/case right/NOUN/2/nmod", "smaller dog", (), "small", "right"),
    ("no-article", "lady next to man", "lady/NOUN/0/root next/ADV/1/advmod to/ADP/4/case man/NOUN/2/obl",
     "lady", ("man",), "none", "none"),
    ("no-article", "bird on top of tree",
     "bird/NOUN/0/root on/ADP/3/case top/NOUN/1/nmod of/ADP/5/case tree/NOUN/3/nmod", "bird", ("tree",), "up", "up"),
    ("no-article", "woman sitting on couch",
     "woman/NOUN/0/root sitting/VERB/1/acl on/ADP/4/case couch/NOUN/2/obl", "woman", ("couch",), "none", "none"),
    ("no-article", "man is on right", "man/NOUN/4/nsubj is/AUX/4/cop on/ADP/4/case right/NOUN/0/root",
     "man", (), "right", "right"),
    ("no-article", "baby elephant", "baby/NOUN/2/compound elephant/NOUN/0/root", "baby elephant", (), "none", "none"),
    ("no-article", "giraffe eating leaves", "giraffe/NOUN/0/root eating/VERB/1/acl leaves/NOUN/2/obj",
     "giraffe", ("leaves",), "none", "none"),
    ("no-article", "tennis player", "tennis/NOUN/2/compound player/NOUN/0/root", "tennis player", (), "none", "none"),
    ("no-article", "catcher", "catcher/NOUN/0/root", "catcher", (), "none", "none"),
    ("no-article", "man", "man/NOUN/0/root", "man", (), "none", "none"),
    ("no-article", "hot dog on left", "hot/ADJ/2/amod dog/NOUN/0/root on/ADP/4/case left/NOUN/2/nmod",
     "hot dog", (), "left", "left"),
    ("no-article", "apple inside bowl", "apple/NOUN/0/root inside/ADP/3/case bowl/NOUN/1/nmod",
     "apple", ("bowl",), "within", "none"),
    ("no-article", "left half of sandwich",
     "left/ADJ/2/amod half/NOUN/0/root of/ADP/4/case sandwich/NOUN/2/nmod", "sandwich", ("left half",), "none",
     "left"),
    ("no-article", "right side of bed",
     "right/ADJ/2/amod side/NOUN/0/root of/ADP/4/case bed/NOUN/2/nmod", "bed", ("right side",), "none", "right"),
    ("no-article", "cake bottom", "cake/NOUN/2/compound bottom/NOUN/0/root", "cake", (), "none", "down"),
    ("no-article", "guy on bike", "guy/NOUN/0/root on/ADP/3/case bike/NOUN/1/nmod", "guy", ("bike",), "none", "none"),
    ("no-article", "sandwich closest to us",
     "sandwich/NOUN/0/root closest/ADJ/1/amod to/ADP/4/case us/PRON/2/obl", "sandwich", (), "big", "none"),
    ("no-article", "person in middle", "person/NOUN/0/root in/ADP/3/case middle/NOUN/1/nmod",
     "person", (), "none", "middle"),
    ("no-article", "zebra in between", "zebra/NOUN/0/root in/ADP/3/case between/ADV/1/advmod",
     "zebra", (), "none", "middle"),
]

# The same text with another tree stanza could plausibly give: (expression, tree); the parse must equal
# the TERSE row's.
ALTERNATIVE_TREES = [
    ("person far right", "person/NOUN/3/compound far/ADJ/3/amod right/NOUN/0/root"),
    ("person far right", "person/NOUN/0/root far/ADV/3/advmod right/NOUN/1/nmod:npmod"),
    ("person far right", "person/NOUN/3/nsubj far/ADV/3/advmod right/ADJ/0/root"),
    ("guy far left", "guy/NOUN/3/compound far/ADJ/3/amod left/NOUN/0/root"),
    ("zebra right", "zebra/NOUN/2/compound right/NOUN/0/root"),
    ("2nd from left", "2nd/NUM/0/root from/ADP/3/case left/NOUN/1/nmod"),
    ("second from left", "second/ADJ/3/amod from/ADP/3/case left/NOUN/0/root"),
    ("third one", "third/ADJ/2/amod one/PRON/0/root"),
    ("middle one", "middle/ADJ/2/amod one/NUM/0/root"),
    ("left", "left/NOUN/0/root"),
    ("front bike", "front/NOUN/2/compound bike/NOUN/0/root"),
    ("rigth guy", "rigth/NOUN/2/compound guy/NOUN/0/root"),
    ("guy in white", "guy/NOUN/0/root in/ADP/3/case white/ADJ/1/amod"),
    ("very left", "very/ADV/2/advmod left/NOUN/0/root"),
    ("left half of sandwich", "left/NOUN/2/compound half/NOUN/0/root of/ADP/4/case sandwich/NOUN/2/nmod"),
]

FORMS = ("after-noun", "before-noun", "-most", "ordinal", "corner", "front-back", "closest-farthest",
         "clothes-colour", "no-noun", "typo", "no-article")
BY_TEXT = {row[1]: row for row in TERSE}


def tree(spec: str) -> list[tuple[str, str, int, str]]:
    words = []
    for item in spec.split():
        text, upos, head, deprel = item.rsplit("/", 3)
        words.append((text, upos, int(head), deprel))
    return words


def document(words) -> Document:
    return Document([[{"id": i + 1, "text": t, "upos": u, "head": h, "deprel": d}
                      for i, (t, u, h, d) in enumerate(words)]], text=" ".join(w[0] for w in words))


def stanza_parse(spec: str):
    parser = StanzaParser(pipeline=lambda text: pytest.fail("no model call expected"))
    return parser.parse_document(document(tree(spec)))


def test_the_table_is_large_and_covers_every_form():
    assert len(TERSE) >= 150
    assert len(BY_TEXT) == len(TERSE), "an expression is listed twice"
    counts = Counter(row[0] for row in TERSE)
    assert set(counts) == set(FORMS) and min(counts.values()) >= 8, counts


@pytest.mark.parametrize("spec", [row[2] for row in TERSE] + [alt[1] for alt in ALTERNATIVE_TREES])
def test_trees_are_well_formed(spec):
    words = tree(spec)
    assert sum(h == 0 for _, _, h, _ in words) == 1
    for i, (_, upos, head, _) in enumerate(words, 1):
        assert 0 <= head <= len(words) and head != i
        assert upos in {"NOUN", "PROPN", "PRON", "ADJ", "ADV", "ADP", "DET", "NUM", "VERB", "AUX", "PART", "PUNCT"}
        seen, h = set(), head  # no cycles: every word reaches the root
        while h:
            assert h not in seen
            seen.add(h)
            h = words[h - 1][2]


def _fields(parsed):
    return parsed.noun_phrase, parsed.other_nouns, parsed.relation, parsed.direction


@pytest.mark.parametrize("form, text, spec, noun_phrase, others, relation, direction", TERSE,
                         ids=[f"{r[0]}:{r[1]}" for r in TERSE])
def test_stanza_tree_logic(form, text, spec, noun_phrase, others, relation, direction):
    parsed = stanza_parse(spec)
    assert _fields(parsed) == (noun_phrase, others, relation, direction)
    assert parsed.sentence == text


@pytest.mark.parametrize("form, text, spec, noun_phrase, others, relation, direction", TERSE,
                         ids=[f"{r[0]}:{r[1]}" for r in TERSE])
def test_rule_parser(form, text, spec, noun_phrase, others, relation, direction):
    assert tokenize(text) == [w[0] for w in tree(spec)], "the rule tokenizer splits differently from stanza"
    parsed = RuleParser()(text)
    assert _fields(parsed) == (noun_phrase, others, relation, direction)
    assert parsed.sentence == text


@pytest.mark.parametrize("text, spec", ALTERNATIVE_TREES, ids=[f"{t}:{s}" for t, s in ALTERNATIVE_TREES])
def test_parse_does_not_depend_on_which_plausible_tree(text, spec):
    row = BY_TEXT[text]
    assert [w[0] for w in tree(spec)] == text.split()
    assert _fields(stanza_parse(spec)) == row[3:]


def test_a_corner_after_the_noun_takes_its_direction_from_the_tree():
    # The spec's earliest-head rule reads the tree: if "bottom" hangs off "left", "left" (hanging off the
    # noun) wins; if both hang off one word, the first ("bottom") does. Both trees are plausible for
    # stanza; the rule parser builds the first.
    assert _fields(stanza_parse("chair/NOUN/0/root bottom/ADJ/3/amod left/NOUN/1/nmod:npmod")) == \
        ("chair", (), "left", "left")
    assert _fields(stanza_parse("chair/NOUN/3/compound bottom/NOUN/3/compound left/NOUN/0/root")) == \
        ("chair", (), "left", "down")


def test_stanza_parser_shows_the_tree_it_reads():
    seen = []
    spec = BY_TEXT["person far right"][2]
    parser = StanzaParser(pipeline=lambda text: seen.append(text) or document(tree(spec)))
    words = parser.tree("Person far RIGHT")
    assert seen == ["person far right"]
    assert [(w.text, w.upos, w.head, w.deprel) for w in words] == \
        [("person", "NOUN", 0, "root"), ("far", "ADV", 2, "advmod"), ("right", "ADV", 0, "advmod")]
    assert parser("Person far RIGHT").noun_phrase == "person"


def test_keyword_forms():
    assert keyword_form("rightmost") == keyword_form("right-most") == keyword_form("rigth") == "right"
    assert keyword_form("closest") == "closer" and keyword_form("farthest") == "further"
    assert keyword_form("font") == "font" and keyword_form("blow") == "blow"  # words of their own
    assert keyword_form("upper") == "upper" and keyword_form("far") == "far"
    assert not set(KEYWORD_FORMS) & PLACE_WORDS, "a variant must not shadow a listed word"
