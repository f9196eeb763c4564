"""Offline scorers, each following the rule of the benchmark's official (or LLaVA's) scorer.

Every scorer takes the benchmark's questions (`readers.Question`, ground truth in `gt`) and a
{question key: generated text} map and returns {metric: value} plus "num_scored" (questions
with both an answer and ground truth). Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence

from gamma_mod_jax.eval.benchmarks.readers import OPTION_LETTERS

# ----------------------------------------------------------------------------- VQA normalisation
# The VQA evaluation's answer processing (as EvalAI, TextVQA and LLaVA apply it): lower case,
# punctuation removed or spaced, number words to digits, articles dropped, contractions
# restored to their apostrophe forms.

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've "
    "y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_table() -> Dict[str, str]:
    """Spellings with apostrophes left out (all of them, or one of two) -> the canonical form."""
    table = {}
    for word in _CANONICAL_CONTRACTIONS:
        table[word.replace("'", "")] = word
        positions = [i for i, c in enumerate(word) if c == "'"]
        if len(positions) > 1:
            for i in positions:
                table[word[:i] + word[i + 1:]] = word
    return table


_CONTRACTIONS = _contraction_table()


def normalise_vqa_answer(text: str) -> str:
    """The VQA answer normalisation: "Two." -> "2", "A red car" -> "red car", "dont" -> "don't"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark next to a space (or any text with a digit-comma-digit) is removed,
    # otherwise it separates words.
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_soft_score(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one answer: min(#matching references / 3, 1) averaged over the
    subsets that leave one of the references out (10 choose 9 for VQAv2 / TextVQA)."""
    pred = normalise_vqa_answer(prediction)
    refs = [normalise_vqa_answer(r) for r in references]
    if not refs:
        raise ValueError("no reference answers")
    matches = sum(r == pred for r in refs)
    total = 0.0
    for r in refs:
        others = matches - (r == pred)
        total += min(others / 3.0, 1.0)
    return total / len(refs)


# ----------------------------------------------------------------------------- helpers


def _scored(questions, answers):
    return [(q, answers[q.key]) for q in questions if q.key in answers and q.gt is not None]


def _mean(values: List[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


# ----------------------------------------------------------------------------- scorers


def score_gqa(questions, answers) -> Dict[str, float]:
    """Exact match after LLaVA's GQA conversion (trailing periods removed, lower case)."""
    pairs = _scored(questions, answers)
    hits = [text.strip().rstrip(".").lower() == str(q.gt).strip().lower() for q, text in pairs]
    return {"accuracy": _mean(hits), "num_scored": len(pairs)}


def parse_sqa_letter(text: str, num_choices: int) -> Optional[str]:
    """LLaVA's ScienceQA parse: the bare letter, "X. ...", or exactly one "The answer is X."."""
    letters = OPTION_LETTERS[:5]
    if text in letters:
        letter = text
    elif len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in OPTION_LETTERS[:num_choices] else None


def score_sqa(questions, answers) -> Dict[str, float]:
    """SQA-IMG accuracy: the parsed letter names the answer choice (unparseable: wrong)."""
    pairs = _scored(questions, answers)
    hits = [parse_sqa_letter(text.strip(), q.gt["num_choices"]) == OPTION_LETTERS[q.gt["answer"]] for q, text in pairs]
    return {"accuracy": _mean(hits), "num_scored": len(pairs)}


def score_vqa(questions, answers) -> Dict[str, float]:
    """TextVQA / VQAv2-val accuracy (vqa_soft_score averaged over questions)."""
    pairs = _scored(questions, answers)
    return {"accuracy": _mean([vqa_soft_score(text, q.gt) for q, text in pairs]), "num_scored": len(pairs)}


def pope_yes_no(text: str) -> str:
    """LLaVA's POPE parse: first sentence, commas dropped; "no" if the words hold No / no / not."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _binary_metrics(preds: List[str], labels: List[str]) -> Dict[str, float]:
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l != "yes" for p, l in zip(preds, labels))
    tn = sum(p != "yes" and l != "yes" for p, l in zip(preds, labels))
    fn = sum(p != "yes" and l == "yes" for p, l in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(preds)
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0, "num_scored": n}


def score_pope(questions, answers) -> Dict[str, object]:
    """Per split (adversarial / popular / random): accuracy, precision, recall, F1, yes ratio;
    "f1" and "accuracy" at the top are the means over splits (LLaVA reports the mean F1)."""
    pairs = _scored(questions, answers)
    splits = {}
    for category in sorted({q.category for q, _ in pairs}):
        sub = [(q, t) for q, t in pairs if q.category == category]
        splits[category] = _binary_metrics([pope_yes_no(t) for _, t in sub], [q.gt for q, _ in sub])
    return {"f1": _mean([s["f1"] for s in splits.values()]), "accuracy": _mean([s["accuracy"] for s in splits.values()]),
            "splits": splits, "num_scored": len(pairs)}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_yes_no(text: str) -> str:
    """MME's parse: "yes" / "no", else the one of them within the first four characters, else "other"."""
    text = text.lower().strip()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(questions, answers) -> Dict[str, object]:
    """Per category: acc (questions right) and acc+ (images with both questions right),
    score = 100 (acc + acc+); "perception" and "cognition" sum their categories' scores."""
    pairs = _scored(questions, answers)
    categories = {}
    for category in sorted({q.category for q, _ in pairs}):
        sub = [(q, t) for q, t in pairs if q.category == category]
        right = [mme_yes_no(t) == str(q.gt).strip().lower() for q, t in sub]
        per_image: Dict[str, List[bool]] = {}
        for (q, _), r in zip(sub, right):
            per_image.setdefault(q.extra.get("image_name") or q.key, []).append(r)
        acc = _mean(right)
        acc_plus = _mean([all(v) for v in per_image.values()])
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
    return {"perception": sum(c["score"] for k, c in categories.items() if k in MME_PERCEPTION),
            "cognition": sum(c["score"] for k, c in categories.items() if k in MME_COGNITION),
            "categories": categories, "num_scored": len(pairs)}


def extract_choice(text: str, options: Sequence[str]) -> Optional[str]:
    """The option letter a free-form answer names, or None: the one option letter standing
    alone in the text ("B", "B.", "(B) ...", "The answer is B"; "A or B" names none), else the
    one option whose text the answer contains."""
    letters = OPTION_LETTERS[:len(options)]
    text = text.strip()
    alone = set(re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text)) & set(letters)
    if len(alone) == 1:
        return alone.pop()
    if alone:
        return None
    lowered = text.lower()
    named = [letter for letter, option in zip(letters, options) if option and option.strip().lower() in lowered]
    return named[0] if len(named) == 1 else None


def score_mmbench(questions, answers) -> Dict[str, object]:
    """Rule-based choice extraction; "accuracy": the first (unrotated) pass; "circular_accuracy":
    a question counts only if every rotation of its options is answered right."""
    pairs = _scored(questions, answers)
    right = {q.key: extract_choice(t, q.extra["options"]) == q.gt for q, t in pairs}
    by_question: Dict[str, List[bool]] = {}
    for q, _ in pairs:
        by_question.setdefault(str(q.question_id), []).append(right[q.key])
    first = [right[q.key] for q, _ in pairs if q.round_id == 0]
    return {"accuracy": _mean(first), "circular_accuracy": _mean([all(v) for v in by_question.values()]),
            "num_questions": len(by_question), "num_scored": len(pairs)}


def score_seed(questions, answers) -> Dict[str, float]:
    """LLaVA's SEED scorer: the answer text equals the letter; overall and image-question accuracy."""
    pairs = _scored(questions, answers)
    hits = [t.strip() == q.gt for q, t in pairs]
    image = [h for (q, _), h in zip(pairs, hits) if q.extra.get("data_type", "image") == "image"]
    return {"accuracy": _mean(hits), "image_accuracy": _mean(image), "num_scored": len(pairs)}


def score_mmmu(questions, answers) -> Dict[str, float]:
    """Multiple choice by choice extraction (no random fallback: unparseable is wrong);
    open questions by the VQA-normalised exact match."""
    pairs = _scored(questions, answers)
    hits = []
    for q, t in pairs:
        if q.extra.get("options"):
            hits.append(extract_choice(t, q.extra["options"]) == q.gt)
        else:
            hits.append(normalise_vqa_answer(t) == normalise_vqa_answer(q.gt))
    return {"accuracy": _mean(hits), "num_scored": len(pairs)}


SCORERS = {"gqa": score_gqa, "sqa": score_sqa, "textvqa": score_vqa, "vqav2": score_vqa, "pope": score_pope,
           "mme": score_mme, "mmbench": score_mmbench, "seed": score_seed, "mmmu": score_mmmu}

# The number each benchmark contributes to the paper's tables (percent, MME in points).
HEADLINE = {"gqa": ("accuracy", 100), "sqa": ("accuracy", 100), "textvqa": ("accuracy", 100),
            "vqav2": ("accuracy", 100), "pope": ("f1", 100), "mme": ("perception", 1),
            "mmbench": ("circular_accuracy", 100), "seed": ("image_accuracy", 100), "mmmu": ("accuracy", 100)}


def score_benchmark(name: str, questions: Iterable, answers: Dict[str, str]) -> Optional[Dict[str, object]]:
    """The offline scores of benchmark `name`, or None when it has no offline scorer."""
    scorer = SCORERS.get(name)
    if scorer is None:
        return None
    scores = scorer(list(questions), answers)
    metric, scale = HEADLINE[name]
    scores["headline"] = scores[metric] * scale
    return scores
