"""VQAv2 answer normalisation, exact match and the VQAv2 soft accuracy, overall and per question type."""

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_NUMBER_COMMA = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" drops every period not followed by a digit ("3.5" keeps its own).
_PERIOD = re.compile(r"\.(?!\d)")
_DIGITS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't must've needn't
not've o'clock oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _spellings_without_apostrophes(word: str) -> set[str]:
    """Every spelling of ``word`` with one or more of its apostrophes left out."""
    parts = word.split("'")
    spellings = set()
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        text = parts[0] + "".join(("'" if k else "") + part for k, part in zip(keep, parts[1:], strict=True))
        spellings.add(text)
    spellings.discard(word)
    return spellings


_CONTRACTIONS = {spelling: word for word in _CONTRACTED for spelling in _spellings_without_apostrophes(word)}


def normalize_answer(answer: str) -> str:
    """Normalise an answer as the official VQAv2 evaluation does.

    Punctuation is removed (or turned into a space when it joins two words: "black-and-white" ->
    "black and white"), periods not followed by a digit are dropped, the text is lower-cased, number
    words zero..ten become digits, articles a/an/the are removed and common contractions get their
    apostrophes back ("dont" -> "don't"). Examples: "Two" -> "2", "a dog." -> "dog", "1,000" -> "1000".
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    glued = _NUMBER_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        # Like the official code, the test looks at the text before any replacement.
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued) else " ")
    out = _PERIOD.sub("", out)
    words = [_DIGITS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _soft_score(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of a normalised prediction against normalised annotator answers, in [0, 1]."""
    matches = sum(a == prediction for a in answers)
    if len(answers) == 1:
        return float(matches)
    # Leave each annotator out in turn: min(#others who gave the prediction / 3, 1), averaged.
    return sum(min((matches - (a == prediction)) / 3, 1.0) for a in answers) / len(answers)


def vqa_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction, in [0, 1].

    With n annotator answers, each one is left out in turn and the prediction scores
    min(#remaining annotators who gave it / 3, 1); the n scores are averaged, as the official
    evaluation does over the 10-choose-9 subsets. Both sides go through :func:`normalize_answer`.
    With a single answer there is nothing to leave out, and the score is 1 on a match, else 0.
    """
    if len(answers) == 0:
        raise ValueError("no reference answers")
    return _soft_score(normalize_answer(prediction), [normalize_answer(a) for a in answers])


def vqa_scores(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    question_types: Sequence[str] | None = None,
) -> dict[str, float]:
    """Exact match and VQAv2 soft accuracy, in percent, of one predicted answer per question.

    - ``exact_match``: the normalised prediction equals the most common normalised answer (on a tie,
      the tied answer that comes first in the list).
    - ``vqa_soft``: the mean of :func:`vqa_soft_score`.

    With ``question_types`` (one per question) the result also has ``exact_match/<type>`` and
    ``vqa_soft/<type>`` for every type. Raises ValueError on a length mismatch or a question
    without answers, naming the question.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists; one list per question")
    if question_types is not None and len(question_types) != len(predictions):
        raise ValueError(f"got {len(question_types)} question types for {len(predictions)} questions")
    if not predictions:
        raise ValueError("no predictions to score")
    by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    rows = []
    for i, (pred, refs) in enumerate(zip(predictions, answers, strict=True)):
        if isinstance(refs, str):
            raise TypeError(f"answers of question {i} is a str; pass a list of annotator answers")
        if len(refs) == 0:
            raise ValueError(f"question {i} has no reference answers")
        pred_norm = normalize_answer(pred)
        refs_norm = [normalize_answer(a) for a in refs]
        exact = float(pred_norm == Counter(refs_norm).most_common(1)[0][0])
        row = (exact, _soft_score(pred_norm, refs_norm))
        rows.append(row)
        if question_types is not None:
            by_type[question_types[i]].append(row)
    scores = _percent("", rows)
    for qtype, type_rows in by_type.items():
        scores.update(_percent(f"/{qtype}", type_rows))
    return scores


def _percent(suffix: str, rows: list[tuple[float, float]]) -> dict[str, float]:
    return {
        f"exact_match{suffix}": 100.0 * sum(r[0] for r in rows) / len(rows),
        f"vqa_soft{suffix}": 100.0 * sum(r[1] for r in rows) / len(rows),
    }
