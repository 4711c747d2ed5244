"""The official VQA answer processing and accuracy (Antol et al. 2015), for ``ddfm eval``.

The tables and steps follow ``vqaEval.py`` of the official VQA evaluation, by Aishwarya
Agrawal: GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at commit
a013f00 ("Fixed processing answers bug", 2021, the newest), ``VQAEval.__init__``,
``evaluate``, ``processPunctuation`` and ``processDigitArticle``. The tables below are
copied verbatim from it (BSD licence, notice below); the functions restate its steps.

What the official ``evaluate`` does for one question with the answers of 10 humans:

1. every human answer and the prediction: ``\\n`` and ``\\t`` become spaces, then ``strip()``;
2. only **if the humans disagree** (``len(set(gtAnswers)) > 1``): every human answer and
   the prediction go through :func:`process_punctuation` and then
   :func:`process_digit_article` (lowercase, number words to digits, articles dropped,
   contractions restored); a unanimous panel is compared as written;
3. accuracy = the mean, over the 10 ways of leaving one human out, of
   ``min(1, #other humans whose answer == prediction / 3)`` (:func:`vqa_accuracy`).

(The older script, before a013f00, processed the prediction always and the human answers
with :func:`process_punctuation` only, and only when they disagreed; the maintainers fixed
that asymmetry. Both sides now go through the same steps.)

**One reference answer** (our records have one ``gpt`` turn, not 10 human answers): a
single reference stands for a panel that agrees on it, so the accuracy ``min(1, #humans
that gave the prediction / 3)`` is 1 when the prediction is that answer and 0 otherwise —
exact match (:func:`exact_match`). Unlike VQA's released annotations our references and
the generations are free text ("A sneaker.", "Seven"), so both sides go through the steps
of the disagreeing branch (:func:`normalize_answer`) before they are compared, as the
official script does whenever it normalises at all. ``exact_match(p, r)`` equals
``vqa_accuracy(normalize_answer(p), [normalize_answer(r)] * 10) == 1``.
"""

# Tables from vqaEval.py: Copyright (c) 2014, Aishwarya Agrawal. All rights reserved.
#
# Redistribution and use in source and binary forms, with or without modification, are
# permitted provided that the following conditions are met:
# 1. Redistributions of source code must retain the above copyright notice, this list of
#    conditions and the following disclaimer.
# 2. Redistributions in binary form must reproduce the above copyright notice, this list of
#    conditions and the following disclaimer in the documentation and/or other materials
#    provided with the distribution.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS
# OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF
# MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE
# COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
# EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
# SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION)
# HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR
# TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS
# SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
#
# The views and conclusions contained in the software and documentation are those of the
# authors and should not be interpreted as representing official policies, either expressed
# or implied, of the FreeBSD Project.

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["process_punctuation", "process_digit_article", "normalize_answer", "exact_match", "vqa_accuracy"]

# VQAEval.contractions, all 120 entries in the file's order. Its capitalised keys ("Im",
# "Ive", "Id've", ...) never match, because processDigitArticle lowercases first: kept as is.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# VQAEval.manualMap
_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# VQAEval.articles
_ARTICLES = ["a", "an", "the"]
# VQAEval.periodStrip: "(?!<=" is a lookahead for the text "<=", not a lookbehind, so a period is
# dropped unless a digit follows ("3.5" stays, "5." loses it) -- as in the official script
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# VQAEval.commaStrip
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# VQAEval.punct (no period: _PERIOD_STRIP handles it; no apostrophe: "don't" keeps its own)
_PUNCT = [";", r"/", "[", "]", '"', "{", "}",
          "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]
# processPunctuation calls periodStrip.sub("", text, re.UNICODE): the flag lands in sub's
# `count` argument, so at most re.UNICODE (= 32) periods are removed. Kept, to give the same
# string on every input.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: each mark of ``_PUNCT`` is deleted when it touches a
    space in ``text`` (or when ``text`` holds a digit-comma-digit anywhere), else replaced by
    a space; then periods not followed by a digit are deleted."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lowercase, split on whitespace, number words to
    digits, articles dropped, then contractions restored; words joined by one space."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    # the first step of VQAEval.evaluate, for human answers and the prediction alike
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """An answer as the official script normalises it when the humans disagree: whitespace
    cleaned, :func:`process_punctuation`, then :func:`process_digit_article`.

    >>> normalize_answer("  The Two dogs!")
    '2 dogs'
    """
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy of one prediction against the answers of several humans
    (``VQAEval.evaluate`` for one question), in [0, 1].

    Human answers are normalised together with the prediction only when they are not all
    the same (see the module docstring); then accuracy = mean over i of ``min(1, #{j != i:
    answers[j] == prediction} / 3)``.
    """
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    gts, res = [_clean(a) for a in answers], _clean(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    matches = [g == res for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def exact_match(prediction: str, reference: str) -> bool:
    """VQA accuracy against one reference answer: normalised exact match (module docstring)."""
    return normalize_answer(prediction) == normalize_answer(reference)
