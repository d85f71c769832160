"""Image-text metrics against values worked out by hand in the comments."""

import math

import pytest
import torch

from pretrainlab.metrics.captioning import caption_scores, normalize_caption
from pretrainlab.metrics.grounding import box_iou, grounding_scores
from pretrainlab.metrics.vqa import normalize_answer, vqa_scores, vqa_soft_score

# ---------------------------------------------------------------- captioning


def test_normalize_caption_lowercases_and_strips_punctuation():
    assert normalize_caption("  A Dog's ball,  RED!") == "a dogs ball red"
    assert normalize_caption("black-and-white photo.") == "black and white photo"


def test_identical_captions_score_bleu_100_and_cider_10():
    # Every n-gram matches and lengths agree: all precisions 1, no brevity penalty -> BLEU 100.
    # CIDEr: N = 2 images; "a" is in both images' references, so its idf is log(2/2) = 0; every other
    # n-gram has idf log(2/1). The prediction's tf-idf vector equals its reference's, so the cosine is 1
    # for n = 1..4 (each caption has a 4-gram); mean over n = 1, one reference, times 10 -> 10.
    preds = ["a dog runs fast", "a cat sleeps here"]
    scores = caption_scores(preds, [["a dog runs fast"], ["a cat sleeps here"]])
    for n in (1, 2, 3, 4):
        assert scores[f"bleu{n}"] == pytest.approx(100.0, abs=1e-6)
    assert scores["cider"] == pytest.approx(10.0)


def test_predictions_are_normalised_before_scoring():
    scores = caption_scores(["A DOG runs, fast!", "a cat sleeps here."], [["a dog runs fast"], ["A cat sleeps here"]])
    assert scores["bleu4"] == pytest.approx(100.0, abs=1e-6)
    assert scores["cider"] == pytest.approx(10.0)


def test_prediction_sharing_no_ngram_scores_zero():
    # No word in common: every clipped precision is 0 -> BLEU 0; every tf-idf dot product is 0 -> CIDEr 0.
    scores = caption_scores(
        ["red blue green yellow", "up down left right"],
        [["one two three four"], ["five six seven eight"]],
    )
    for n in (1, 2, 3, 4):
        assert scores[f"bleu{n}"] == pytest.approx(0.0, abs=1e-3)
    assert scores["cider"] == pytest.approx(0.0)


def test_bleu_worked_example_with_brevity_penalty_and_closest_reference():
    # prediction: "the cat sat on the mat"                    6 words
    # ref 1:      "the cat sat on the mat today"              7 words, |6 - 7| = 1  <- closest
    # ref 2:      "a cat"                                     2 words, |6 - 2| = 4
    # clipped matches / guesses: 1-grams 6/6 ("the" x2 allowed by ref 1), 2-grams 5/5, 3-grams 4/4, 4-grams 3/3
    # brevity penalty: c = 6 < r = 7 -> exp(1 - 7/6) = exp(-1/6) = 0.846482
    # BLEU-n = BP * (prod of precisions)^(1/n) = 0.846482 for every n -> 84.6482
    scores = caption_scores(["the cat sat on the mat"], [["the cat sat on the mat today", "a cat"]])
    bp = math.exp(1 - 7 / 6)
    assert bp == pytest.approx(0.846482, abs=1e-6)
    for n in (1, 2, 3, 4):
        assert scores[f"bleu{n}"] == pytest.approx(100 * bp, abs=1e-5)


def test_bleu_clips_repeated_words():
    # "the" x4 against "the cat is here": "the" counts at most once -> p1 = 1/4; 4 = 4 words, no penalty.
    scores = caption_scores(["the the the the"], [["the cat is here"]])
    assert scores["bleu1"] == pytest.approx(25.0, abs=1e-6)
    # "the the" never occurs in the reference: p2 = 0 -> BLEU-2 = 0.
    assert scores["bleu2"] == pytest.approx(0.0, abs=1e-3)


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    # image A: "a dog runs fast" vs itself        -> 1-grams 4/4, 2-grams 3/3, 3-grams 2/2, 4-grams 1/1
    # image B: "one two" vs "five six"            -> 1-grams 0/2, 2-grams 0/1, no 3- or 4-grams
    # summed: p1 = 4/6, p2 = 3/4, p3 = 2/2, p4 = 1/1; lengths 6 = 6, no penalty
    # BLEU-4 = (2/3 * 3/4 * 1 * 1)^(1/4) = 0.5^(1/4) = 0.840896 (a mean of sentence scores would give 0.5)
    scores = caption_scores(["a dog runs fast", "one two"], [["a dog runs fast"], ["five six"]])
    assert scores["bleu1"] == pytest.approx(100 * 4 / 6, abs=1e-5)
    assert scores["bleu2"] == pytest.approx(100 * math.sqrt(4 / 6 * 3 / 4), abs=1e-5)
    assert scores["bleu4"] == pytest.approx(100 * 0.5**0.25, abs=1e-5)


def test_cider_partial_match_worked_example():
    # N = 2 images, L = log 2. df: "a" in both images -> idf 0; all other n-grams idf log(2/1) = L
    # (an n-gram absent from every reference also gets log(2/1), as df is clamped to 1).
    # image 1: "a dog sleeps" vs "a dog runs" (same length, no length penalty)
    #   1-grams: pred {a:0, dog:L, sleeps:L}, ref {a:0, dog:L, runs:L}: dot L^2, norms sqrt(2)L -> 1/2
    #   2-grams: pred {a dog:L, dog sleeps:L}, ref {a dog:L, dog runs:L} -> 1/2
    #   3-grams: "a dog sleeps" vs "a dog runs" -> 0; 4-grams: none -> 0
    #   mean (1/2 + 1/2 + 0 + 0) / 4 = 1/4, times 10 -> 2.5
    # image 2: "a cat sleeps" identical to its reference: cosines 1, 1, 1 and 0 (no 4-gram) -> 10 * 3/4 = 7.5
    # corpus CIDEr = (2.5 + 7.5) / 2 = 5.0
    scores = caption_scores(["a dog sleeps", "a cat sleeps"], [["a dog runs"], ["a cat sleeps"]])
    assert scores["cider"] == pytest.approx(5.0)


def test_cider_averages_over_references():
    # image 1 has two references: the identical one gives cosines 1 at every n (mean 1), the unrelated
    # one gives 0 -> (1 + 0) / 2 references * 10 = 5. Image 2 identical -> 10. Corpus (5 + 10) / 2 = 7.5.
    scores = caption_scores(
        ["a dog runs fast", "a cat sleeps here"],
        [["a dog runs fast", "red blue green yellow"], ["a cat sleeps here"]],
    )
    assert scores["cider"] == pytest.approx(7.5)


def test_cider_of_a_single_image_is_zero():
    # One image: every reference n-gram has df 1 = N, so idf = log(1/1) = 0 and all vectors vanish.
    assert caption_scores(["a dog runs fast"], [["a dog runs fast"]])["cider"] == 0.0


def test_caption_scores_reject_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 1 has no reference captions"):
        caption_scores(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match="reference 0 of image 0 is empty"):
        caption_scores(["a dog"], [["..."]])
    with pytest.raises(TypeError, match="image 0 is a str"):
        caption_scores(["a dog"], ["a dog"])
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores([], [])


# ---------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("The two dogs", "2 dogs"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black-and-white", "black and white"),
        ("Yes!", "yes"),
        ("red, white", "red white"),
        ("dont", "don't"),
        ("\tnone\n", "0"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_soft_score_by_number_of_matching_annotators():
    # 10 annotators, k gave the prediction. Leaving one out (10 subsets of 9):
    # k = 2: 8 subsets keep both -> min(2/3, 1); 2 drop one -> 1/3   -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    # k = 1: 9 subsets keep it -> 1/3; 1 drops it -> 0               -> 9 * 1/3 / 10 = 0.3
    # k = 3: 7 subsets keep all -> 1; 3 keep two -> 2/3              -> (7 + 3 * 2/3) / 10 = 0.9
    # k = 4: every subset keeps at least 3 -> 1
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["dog"] * k + ["cat"] * (10 - k)
        assert vqa_soft_score("dog", answers) == pytest.approx(expected), k


def test_vqa_soft_score_normalises_both_sides_and_single_answers():
    assert vqa_soft_score("Two", ["2"] * 10) == pytest.approx(1.0)
    assert vqa_soft_score("the dog.", ["Dog"] * 10) == pytest.approx(1.0)
    assert vqa_soft_score("dog", ["dog"]) == 1.0
    assert vqa_soft_score("cat", ["dog"]) == 0.0
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_soft_score("dog", [])


def test_vqa_scores_overall_and_per_question_type():
    answers = [
        ["2"] * 6 + ["3"] * 4,  # q0: "two" -> "2" is the most common: exact 1, soft 1
        ["red"] * 2 + ["blue"] * 8,  # q1: "red" is said by 2 of 10: exact 0, soft 0.6
        ["yes"] * 10,  # q2: "no": exact 0, soft 0
    ]
    scores = vqa_scores(["two", "red", "no"], answers, question_types=["how many", "what color", "what color"])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["vqa_soft"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert scores["exact_match/how many"] == pytest.approx(100.0)
    assert scores["vqa_soft/how many"] == pytest.approx(100.0)
    assert scores["exact_match/what color"] == pytest.approx(0.0)
    assert scores["vqa_soft/what color"] == pytest.approx(30.0)  # (0.6 + 0) / 2
    assert set(vqa_scores(["two"], [["2"]])) == {"exact_match", "vqa_soft"}


def test_vqa_exact_match_tie_goes_to_first_answer():
    assert vqa_scores(["cat"], [["cat", "dog"]])["exact_match"] == 100.0
    assert vqa_scores(["dog"], [["cat", "dog"]])["exact_match"] == 0.0


def test_vqa_scores_reject_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 answer"):
        vqa_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="question 1 has no reference answers"):
        vqa_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="1 question types for 2 questions"):
        vqa_scores(["a", "b"], [["a"], ["b"]], question_types=["x"])
    with pytest.raises(TypeError, match="question 0 is a str"):
        vqa_scores(["a"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        vqa_scores([], [])


# ---------------------------------------------------------------- grounding


def test_box_iou_hand_values():
    pred = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [3, 3, 3, 3]]
    target = [
        [0, 0, 10, 10],  # identical -> 1
        [20, 20, 30, 30],  # disjoint -> 0
        [10, 0, 20, 10],  # touching edges, zero-area intersection -> 0
        [5, 0, 15, 10],  # half shifted: inter 5*10 = 50, union 100 + 100 - 50 = 150 -> 1/3
        [0, 0, 10, 5],  # inside, half the area: 50 / 100 -> 1/2
        [3, 3, 3, 3],  # two points: zero union -> 0
    ]
    iou = box_iou(pred, target)
    assert iou.dtype == torch.float64
    assert iou.tolist() == pytest.approx([1.0, 0.0, 0.0, 1 / 3, 0.5, 0.0])


def test_grounding_scores_hand_values():
    # IoUs 1, 0, 1/3, 1/2: >= 0.5 for 2 of 4 -> 50 %; mean (1 + 0 + 1/3 + 1/2) / 4 = 11/24 -> 45.8333 %
    pred = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    target = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10], [0, 0, 10, 5]])
    scores = grounding_scores(pred, target)
    assert scores["acc_iou50"] == pytest.approx(50.0)
    assert scores["miou"] == pytest.approx(100 * 11 / 24)


def test_grounding_scores_per_group_hand_values():
    # IoUs 1, 0 (group a) and 1/3, 1/2 (group b)
    pred = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    target = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10], [0, 0, 10, 5]])
    scores = grounding_scores(pred, target, ["a", "a", "b", "b"])
    assert scores["acc_iou50"] == pytest.approx(50.0) and scores["miou"] == pytest.approx(100 * 11 / 24)
    assert scores["acc_iou50/a"] == pytest.approx(50.0) and scores["miou/a"] == pytest.approx(50.0)
    assert scores["acc_iou50/b"] == pytest.approx(50.0) and scores["miou/b"] == pytest.approx(100 * 5 / 12)
    assert scores["samples/a"] == scores["samples/b"] == 2
    with pytest.raises(ValueError, match="got 3 groups for 4 box pairs"):
        grounding_scores(pred, target, ["a", "a", "b"])


def test_grounding_rejects_bad_boxes():
    with pytest.raises(ValueError, match="N x 4"):
        box_iou([[0, 0, 1]], [[0, 0, 1]])
    with pytest.raises(ValueError, match="2 predicted boxes but 1 target"):
        box_iou([[0, 0, 1, 1], [0, 0, 1, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"target\[1\]"):
        box_iou([[0, 0, 1, 1], [0, 0, 1, 1]], [[0, 0, 1, 1], [5, 0, 1, 1]])
    with pytest.raises(ValueError, match="no boxes"):
        grounding_scores(torch.zeros(0, 4), torch.zeros(0, 4))
