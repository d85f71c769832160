"""Corpus BLEU-1..4 and CIDEr-D of predicted captions against several reference captions per image.

The scores come from pycocoevalcap's ``Bleu(4)`` and ``Cider()`` scorers, the code behind the COCO
caption leaderboard. Captions are normalised by :func:`normalize_caption` instead of the Java PTB
tokenizer that coco-caption runs first.
"""

import re
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

_APOSTROPHES = re.compile(r"['\u2019]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_caption(caption: str) -> str:
    """Lower-case, drop apostrophes ("dog's" -> "dogs"), turn other punctuation into spaces, collapse spaces."""
    text = _APOSTROPHES.sub("", caption.lower())
    return " ".join(_NON_WORD.sub(" ", text).split())


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; one list per image"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} is {type(pred).__name__}, expected str")
        if isinstance(refs, str):
            raise TypeError(f"references of image {i} is a str; pass a list of reference captions")
        if len(refs) == 0:
            raise ValueError(f"image {i} has no reference captions")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"reference {j} of image {i} is {type(ref).__name__}, expected str")
            if not normalize_caption(ref):
                raise ValueError(f"reference {j} of image {i} is empty after normalisation: {ref!r}")


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus scores of one predicted caption per image against that image's reference captions.

    Returns ``{"bleu1", "bleu2", "bleu3", "bleu4", "cider"}``:

    - ``bleuN``: corpus BLEU-N as coco-caption computes it (n-gram matches clipped by the largest
      count in any one reference, counts summed over the corpus, brevity penalty against the
      reference length closest to each prediction), times 100, so in [0, 100]. coco-caption's
      smoothing constants stay in: a prediction shorter than n words adds a small BLEU-n.
    - ``cider``: CIDEr-D as coco-caption reports it (tf-idf of 1..4-grams, clipped, gaussian length
      penalty with sigma 6, averaged over references, times 10), not multiplied further: a caption
      identical to its references scores at most 10.0, and 1.1 here is the "110" papers print.
      Document frequencies are counted over the references of the images passed here, as the
      official code does, so the score depends on the evaluated set and is 0 for a single image.

    Raises ValueError (naming the image) on a length mismatch, an image without references, or a
    reference that is empty after :func:`normalize_caption`.
    """
    _check(predictions, references)
    res = {i: [normalize_caption(pred)] for i, pred in enumerate(predictions)}
    gts = {i: [normalize_caption(ref) for ref in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n}": 100.0 * float(value) for n, value in enumerate(bleu, start=1)}
    scores["cider"] = float(cider)
    return scores
