"""Generative image-text evaluation: captioning, VQA and grounding metrics with their baselines on a tiny scenes set
and an untrained tiny BLIP, the samples picture, and the evaluate job on BLIP checkpoints (with a real MLflow store)."""

from __future__ import annotations

import evaluate as evaluate_job
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint
from pretrainlab.config import validate
from pretrainlab.data.catalog import dataset_info
from pretrainlab.data.dataset import load_split_annotated
from pretrainlab.data.scenes import write_scenes
from pretrainlab.data.scenes.language import EXPRESSION_KINDS
from pretrainlab.data.text import (
    FIRST_LOCATION_ID,
    VQA_PROMPT,
    bpe_ids,
    detokenize,
    generated_box,
    prompted_sequences,
    tokenize,
)
from pretrainlab.evaluation.classification import eval_batches
from pretrainlab.evaluation.figures import plot_samples
from pretrainlab.evaluation.generation import (
    centre_box,
    evaluate_captioning,
    evaluate_grounding,
    evaluate_vqa,
    generate_best,
    most_likely_answers,
    predicted_boxes,
)
from pretrainlab.evaluation.image_text import evaluate_retrieval
from pretrainlab.metrics.captioning import caption_scores
from pretrainlab.metrics.retrieval import recall_of_scores, text_gallery
from pretrainlab.strategies import get_strategy

TINY_BLIP = {"embed_dim": 16, "width": 16, "text_layers": 1, "decoder_layers": 1, "heads": 2}
CAPTION_KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A 40-image scenes set at 64 px (4 test images): task -> dataset folder."""
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_images=40, image_size=64, seed=3, workers=1)


def tiny_config(folder, **params):
    return validate(
        {
            "name": "blip-test",
            "strategy": "blip",
            "strategy_params": {**TINY_BLIP, **params},
            "model": {"backbone": "test_resnet", "stem_stride": 1},
            "data": {"dataset": str(folder), "mean": [0.65] * 3, "std": [0.15] * 3},
        }
    )


def tiny_blip(folder, **params):
    torch.manual_seed(0)
    cfg = tiny_config(folder, **params)
    return cfg, get_strategy("blip").build_model(cfg, 0, 3).eval()


def test_generate_best_pairs_each_prompt_with_its_image_across_batches(scenes):
    cfg, model = tiny_blip(scenes["caption"])
    images, _ = load_split_annotated(scenes["caption"], "test")
    owners = [0, 0, 1, 3, 3, 3]
    prompts = [[model.start_id, *ids] for ids in bpe_ids(["a", "b", "c", "d", "e", "f"])]
    best = generate_best(model, images, owners, prompts, cfg.data, batch_size=2, max_new_tokens=3)
    inputs = next(eval_batches(images, cfg.data, len(images)))[owners]
    direct = model.generate(inputs, prompts, max_new_tokens=3)
    assert [h.tokens for h in best] == [found[0].tokens for found in direct]
    with pytest.raises(ValueError, match="must be sorted"):
        generate_best(model, images, [1, 0], prompts[:2], cfg.data, max_new_tokens=1)


def test_captioning_reports_scores_and_the_shuffled_image_baseline(scenes):
    cfg, model = tiny_blip(scenes["caption"])
    images, annotations = load_split_annotated(scenes["caption"], "test")
    metrics, predictions = evaluate_captioning(
        model, images, annotations, cfg.data, batch_size=3, num_beams=2, max_new_tokens=6
    )
    assert set(metrics) == CAPTION_KEYS | {f"shuffled/{k}" for k in CAPTION_KEYS}
    assert len(predictions) == len(images) and all(isinstance(p, str) for p in predictions)
    assert all(0.0 <= metrics[f"{p}bleu{n}"] <= 100.0 for p in ("", "shuffled/") for n in range(1, 5))
    assert 0.0 <= metrics["cider"] <= 10.0
    permutation = np.random.default_rng(0).permutation(len(images))
    shuffled = caption_scores(predictions, [annotations["captions"][j] for j in permutation])
    assert metrics["shuffled/cider"] == pytest.approx(shuffled["cider"])


def test_vqa_answers_every_question_and_the_baseline_sees_a_blank_image(scenes):
    cfg, model = tiny_blip(scenes["vqa"])
    images, annotations = load_split_annotated(scenes["vqa"], "test")
    images, annotations = images[:2], {"questions": annotations["questions"][:2]}
    questions = [q for row in annotations["questions"] for q in row]
    # The blank image is the all-zero normalised input; make its answers the references, so the
    # question-only baseline must score 100.
    prompts = [[model.start_id, *ids] for ids in bpe_ids([VQA_PROMPT.format(q["question"]) for q in questions])]
    blank = torch.zeros(len(prompts), 3, 64, 64)
    blank_answers = [detokenize(found[0].tokens, 48) for found in model.generate(blank, prompts, max_new_tokens=3)]
    relabelled = {
        "questions": [
            [{**q, "answers": [blank_answers.pop(0)]} for q in row]
            for row in annotations["questions"]  # in question order
        ]
    }
    metrics, predictions = evaluate_vqa(model, images, relabelled, cfg.data, batch_size=8, max_new_tokens=3)
    assert len(predictions) == len(questions)
    types = {q["question_type"] for q in questions}
    expected = {"exact_match", "vqa_soft"} | {f"{m}/{t}" for m in ("exact_match", "vqa_soft") for t in types}
    assert set(metrics) == expected | {f"question_only/{k}" for k in expected}
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    assert metrics["question_only/exact_match"] == 100.0
    assert metrics["exact_match"] < 100.0  # this seed's model answers some questions differently about real images


@pytest.mark.slow
def test_ranked_answers_are_the_most_likely_of_the_vocabulary_for_their_own_image(scenes):
    cfg, model = tiny_blip(scenes["vqa"])
    images, annotations = load_split_annotated(scenes["vqa"], "test")
    owners = [i for i, row in enumerate(annotations["questions"]) for _ in row]
    prompts = bpe_ids([VQA_PROMPT.format(q["question"]) for row in annotations["questions"] for q in row])
    vocabulary = ["yes", "no", "red", "2", "large circle"]
    # batches of 3 images and 3 questions: questions of one image cross batch boundaries
    ranked = most_likely_answers(model, images, owners, prompts, vocabulary, cfg.data, batch_size=3)
    blank = most_likely_answers(model, images, owners, prompts, vocabulary, cfg.data, batch_size=3, blank=True)

    inputs = torch.cat(list(eval_batches(images, cfg.data)))
    for image, answers_of in ((inputs, ranked), (torch.zeros_like(inputs), blank)):
        with torch.no_grad():
            tokens = model.image_features(image)[0]
        for question, (owner, prompt) in enumerate(zip(owners, prompts, strict=True)):
            ids, mask = prompted_sequences([prompt] * len(vocabulary), bpe_ids(vocabulary), 48)
            scores = [
                model.target_log_likelihood(
                    tokens[owner : owner + 1], torch.from_numpy(ids[a : a + 1]), torch.from_numpy(mask[a : a + 1])
                ).item()
                for a in range(len(vocabulary))
            ]
            assert answers_of[question] == vocabulary[int(np.argmax(scores))]


def test_centre_box_by_hand():
    # widths 10 and 20 -> 15, heights 20 and 20 -> 20, centred in 64 x 64
    assert centre_box([[0, 0, 10, 20], [10, 10, 30, 30]], 64, 64) == [24.5, 22.0, 39.5, 42.0]
    with pytest.raises(ValueError, match="non-empty N x 4"):
        centre_box([], 64, 64)


def test_generated_box_orders_coordinates_and_gives_an_empty_box_when_cut_short():
    bins = (40, 8, 20, 30)  # x1 > x2 as generated
    assert generated_box([FIRST_LOCATION_ID + b for b in bins], 64, 64) == [20.5, 8.5, 40.5, 30.5]
    assert generated_box([FIRST_LOCATION_ID], 64, 64) == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("box_head", [False, True])
def test_grounding_scores_each_expression_and_the_centre_box_baseline(scenes, box_head):
    cfg, model = tiny_blip(scenes["grounding"], box_head=box_head)
    images, annotations = load_split_annotated(scenes["grounding"], "test")
    images, annotations = images[:2], {"refs": annotations["refs"][:2]}
    metrics, boxes = evaluate_grounding(model, images, annotations, cfg.data, batch_size=8)
    assert set(metrics) == {"acc_iou50", "miou", "centre_box/acc_iou50", "centre_box/miou"}
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    assert len(boxes) == sum(len(ref["expressions"]) for row in annotations["refs"] for ref in row)
    assert all(0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64 for x1, y1, x2, y2 in boxes)
    # two targets by hand: the centre box [24.5, 22, 39.5, 42] misses [0, 0, 10, 20] and overlaps
    # [10, 10, 30, 30] by 5.5 x 8 = 44 of a 300 + 400 - 44 = 656 union
    two = {"refs": [[{"expressions": ["a"], "box": [0, 0, 10, 20]}], [{"expressions": ["b"], "box": [10, 10, 30, 30]}]]}
    metrics, boxes = evaluate_grounding(model, images[:2], two, cfg.data)
    assert len(boxes) == 2
    assert metrics["centre_box/acc_iou50"] == 0.0
    assert metrics["centre_box/miou"] == pytest.approx(100 * (44 / 656) / 2)
    metrics, _ = evaluate_grounding(model, images[:2], two, cfg.data, expression_group=str.upper)
    assert metrics["samples/A"] == metrics["samples/B"] == 1 and "centre_box/samples/A" not in metrics
    assert metrics["centre_box/miou/B"] == pytest.approx(100 * 44 / 656) and metrics["centre_box/miou/A"] == 0.0


def test_predicted_boxes_pair_each_expression_with_its_image_across_batches(scenes):
    cfg, model = tiny_blip(scenes["grounding"], box_head=True)
    images, _ = load_split_annotated(scenes["grounding"], "test")
    owners = [0, 0, 1, 3, 3, 3]
    prompts = [
        [model.start_id, *ids] for ids in bpe_ids(["a box:", "b c box:", "d box:", "e box:", "f box:", "g box:"])
    ]
    boxes = predicted_boxes(model, images, owners, prompts, cfg.data, batch_size=2)
    direct = model.predict_boxes(next(eval_batches(images, cfg.data, len(images)))[owners], prompts)
    expected = [[v * 64 for v in box] for box, _ in direct]
    np.testing.assert_allclose(boxes, expected, rtol=1e-5, atol=1e-4)
    assert all(0 < score <= 1 for _, score in direct)


def test_reranking_every_candidate_ranks_by_the_matching_head_alone(scenes):
    cfg, model = tiny_blip(scenes["retrieval"])
    images, annotations = load_split_annotated(scenes["retrieval"], "test")
    texts, relevant = text_gallery(annotations["captions"], annotations["negatives"], annotations["also_true"])
    pairs = [(i, t) for i in range(len(images)) for t in range(len(texts))]
    batch = torch.cat(list(eval_batches(images, cfg.data)))
    ids = torch.from_numpy(tokenize(texts, cfg.data.context_length))
    matching = model.itm_scores(batch[[i for i, _ in pairs]], ids[[t for _, t in pairs]]).view(len(images), -1)
    expected = recall_of_scores(matching, matching.T, relevant)

    metrics = evaluate_retrieval(model, images, annotations, cfg.data, 16, rerank_k=len(texts))
    assert {key: metrics[f"itm/{key}"] for key in expected} == pytest.approx(expected)
    contrastive = evaluate_retrieval(model, images, annotations, cfg.data, 16, rerank_k=1)
    assert contrastive["itm/t2i_r5"] == pytest.approx(contrastive["t2i_r5"])  # one candidate: the same top 1, R@5 also


def test_plot_samples_draws_at_most_16_images_with_their_text_and_boxes():
    images = np.full((20, 3, 32, 32), 128, dtype=np.uint8)
    lines = [[f"pred: caption {i}", "ref: a reference"] for i in range(20)]
    fig = plot_samples(images, lines, [([1, 1, 10, 10], [2, 2, 12, 12])] * 20)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 16 and len(fig.axes) == 16
    assert drawn[3].texts[0].get_text() == "pred: caption 3\nref: a reference"
    assert len(drawn[0].patches) == 2
    with pytest.raises(ValueError, match="got 2 lists of lines for 20 images"):
        plot_samples(images, lines[:2])


# --- the evaluate job on BLIP checkpoints ---------------------------------------------------------------------------


def blip_checkpoint(folder, task: str, out, **params):
    cfg, model = tiny_blip(folder, **params)
    info = dataset_info(str(folder))  # VQA: the answer vocabulary as class names
    return save_checkpoint(out / task / "checkpoint", model.state_dict(), checkpoint_meta(cfg, info, 1, 2, {}, None))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "names"),
    [
        ("caption", ["bleu4", "cider", "shuffled/cider"]),
        # BLIP on retrieval rows: captioning of their captions, Recall@K contrastive and re-ranked by the matching head
        ("retrieval", ["bleu4", "cider", "shuffled/cider", "t2i_r1", "itm/t2i_r1", "itm/t2i_r1/listing"]),
        ("vqa", ["exact_match", "question_only/vqa_soft", "ranked/vqa_soft/count", "question_only/ranked/vqa_soft"]),
        ("grounding", ["acc_iou50", "miou", "centre_box/miou"]),
    ],
)
def test_evaluate_job_reports_the_task_metrics_of_a_blip_checkpoint(project, scenes, tmp_path, task, names, capsys):
    checkpoint = blip_checkpoint(scenes[task], task, tmp_path)
    assert evaluate_job.main([str(checkpoint), "--split", "test", "--batch-size", "16", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert all(f" {name} " in out for name in names)


def test_evaluate_job_names_a_dataset_of_another_task(project, scenes, tmp_path, capsys):
    checkpoint = blip_checkpoint(scenes["caption"], "caption", tmp_path)
    assert evaluate_job.main([str(checkpoint), "--data", str(scenes["vqa"]), "--no-mlflow"]) == 2
    assert "has no 'captions' column to evaluate a model trained on caption rows" in capsys.readouterr().err


@pytest.mark.parametrize("box_head", [False, True])
def test_evaluate_job_logs_metrics_and_the_samples_picture_to_mlflow(project, scenes, tmp_path, box_head):
    checkpoint = blip_checkpoint(scenes["grounding"], "grounding", tmp_path, box_head=box_head)
    assert evaluate_job.main([str(checkpoint), "--split", "test", "--batch-size", "16"]) == 0
    client = MlflowClient()
    experiment = client.get_experiment_by_name("pretrainlab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"test/acc_iou50", "test/miou", "test/centre_box/miou"} <= set(run.data.metrics)
    # the scenes set: also per kind of expression, every test expression counted once
    samples = {key.split("/")[-1]: n for key, n in run.data.metrics.items() if key.startswith("test/samples/")}
    assert set(samples) <= set(EXPRESSION_KINDS) and f"test/acc_iou50/{next(iter(samples))}" in run.data.metrics
    _, annotations = load_split_annotated(scenes["grounding"], "test")
    assert sum(samples.values()) == sum(len(ref["expressions"]) for row in annotations["refs"] for ref in row)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")]
    assert artifacts == ["evaluation/test/samples.png"]
