"""CLIP: the tokenizer, retrieval Recall@K on hand-built embeddings, the contrastive loss across 2 workers, the
model's steps and evaluation on a tiny scenes set, and the inferencer."""

from __future__ import annotations

import math

import evaluate as evaluate_job
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zero_shot as zero_shot_job
from open_clip.loss import ClipLoss

from conftest import CONFIGS, on_gloo_workers
from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint
from pretrainlab.config import load_config, validate
from pretrainlab.data.dataset import load_split_annotated
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.pipeline import Preprocessor, to_model_inputs
from pretrainlab.data.scenes import write_scenes
from pretrainlab.data.scenes.language import CAPTION_KINDS
from pretrainlab.data.text import detokenize, tokenize
from pretrainlab.evaluation.image_text import evaluate_retrieval, evaluate_retrieval_split
from pretrainlab.evaluation.zero_shot import labelled_images
from pretrainlab.inference.inferencers import ImageTextInferencer
from pretrainlab.inference.loading import load_model
from pretrainlab.inference.zoo import ModelInfo
from pretrainlab.metrics.retrieval import (
    recall_of_scores,
    rerank_top_k,
    retrieval_recall,
    text_gallery,
)
from pretrainlab.models.text import build_text_tower, filled_length
from pretrainlab.strategies import clip, get_strategy
from pretrainlab.train.optim import build_optimizer
from pretrainlab.train.trainer import check_experiment

CONTEXT = 48
TINY_CLIP = {"embed_dim": 16, "text_width": 16, "text_layers": 1, "text_heads": 2}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A 120-image scenes set at 64 px; its retrieval dataset folder."""
    folders = write_scenes(tmp_path_factory.mktemp("scenes"), num_images=120, image_size=64, seed=3, workers=1)
    return folders["retrieval"]


def tiny_config(dataset: str = "scenes/retrieval", **overrides):
    return validate(
        {
            "name": "clip-test",
            "strategy": "clip",
            "strategy_params": TINY_CLIP,
            "model": {"backbone": "test_resnet", "stem_stride": 1},
            "data": {"dataset": dataset, "mean": [0.65] * 3, "std": [0.15] * 3, "context_length": CONTEXT},
            "optim": {"name": "adamw", "lr": 1e-3},
            **overrides,
        }
    )


def train_rows(folder, count: int) -> dict[str, np.ndarray]:
    table = pq.read_table(next(folder.glob("train-*.parquet"))).slice(0, count)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def train_batch(folder, count: int, data) -> dict[str, torch.Tensor]:
    """The model inputs of the first ``count`` training rows through ``data``'s training pipeline (seed 0)."""
    return to_model_inputs(Preprocessor(data, train=True, seed=0)(train_rows(folder, count)), data, "cpu")


# --- tokenizer ------------------------------------------------------------------------------------------------------


def test_tokenize_round_trip():
    texts = ["a large red circle left of a small blue shirt", "there are three objects"]
    ids = tokenize(texts, CONTEXT)
    assert ids.shape == (2, CONTEXT) and ids.dtype == np.int64
    assert [detokenize(row, CONTEXT) for row in ids] == texts
    assert ids[0, 0] == 49406 and ids[1, 5] == 49407 and (ids[1, 6:] == 0).all()  # start, 4 words, end, padding


def test_tokenize_cuts_long_texts_but_keeps_the_end_token():
    ids = tokenize(["one two three four five six seven"], 5)
    assert ids.shape == (1, 5) and ids[0, -1] == 49407
    assert detokenize(ids[0], 5) == "one two three"


def test_the_text_tower_reads_a_batch_cut_after_its_longest_text_as_it_reads_the_padded_one():
    torch.manual_seed(0)
    tower = build_text_tower(context_length=48, width=32, layers=2, heads=2, output_dim=16).eval()
    tower.output_tokens = True
    ids = torch.from_numpy(tokenize(["a red bag", "two small gray squares left of a sneaker", "a"], 48))
    length = filled_length(ids)
    assert length == int((ids != 0).sum(dim=1).max()) and filled_length(ids[:2], ids[2:]) == length
    with torch.no_grad():
        (pooled, tokens), (cut_pooled, cut_tokens) = tower(ids), tower(ids[:, :length])
    assert cut_tokens.shape[1] == length
    torch.testing.assert_close(cut_pooled, pooled)
    torch.testing.assert_close(cut_tokens, tokens[:, :length])
    assert filled_length(torch.zeros(2, 5, dtype=torch.long)) == 1


def test_tokenize_refuses_one_string():
    with pytest.raises(TypeError, match="sequence of texts"):
        tokenize("a caption", CONTEXT)


# --- Recall@K -------------------------------------------------------------------------------------------------------


def test_text_gallery_keeps_distinct_texts_and_relevance():
    texts, relevant = text_gallery([["a", "b"], ["b", "c"]], [["x"], ["a"]])
    assert texts == ["a", "b", "c", "x"]
    assert relevant.tolist() == [[True, True, False, False], [False, True, True, False]]


def test_text_gallery_counts_also_true_texts_as_captions_and_ignores_those_outside_it():
    # image 1 is also described by image 0's caption "a" and by image 0's negative "x"; "zzz" is in no gallery
    texts, relevant = text_gallery([["a", "b"], ["c"]], [["x"], []], [[], ["a", "x", "zzz"]])
    assert texts == ["a", "b", "c", "x"]
    assert relevant.tolist() == [[True, True, False, False], [True, False, True, True]]
    with pytest.raises(ValueError, match="1 lists of also_true for 2 images"):
        text_gallery([["a"], ["b"]], None, [[]])


def test_recall_with_one_hot_embeddings_is_perfect():
    embeddings = torch.eye(4)
    metrics = retrieval_recall(embeddings, embeddings, np.eye(4, dtype=bool))
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 100.0 and metrics["rsum"] == 600.0


def test_recall_counts_rank_of_the_best_relevant_item():
    # 3 images, 4 texts; text 3 is a distractor (relevant to no image, not a query)
    images = torch.eye(3)
    texts = torch.tensor([[0.9, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    relevant = np.array([[True, False, False, False], [False, True, False, False], [False, False, True, False]])
    m = retrieval_recall(images, texts, relevant, ks=(1, 2))
    # i2t: image 0 scores texts (0.9, 0, 0, 1.0): its text 0 is 2nd; image 1 (1.0, 0.5, 0, 0): text 1 2nd;
    # image 2: text 2 first -> R@1 1/3, R@2 3/3
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["i2t_r2"] == 100.0
    # t2i: text 0 scores images (0.9, 1.0, 0): image 0 2nd; text 1 (0, 0.5, 0): image 1 1st; text 2: 1st
    assert m["t2i_r1"] == pytest.approx(200 / 3) and m["t2i_r2"] == 100.0


def test_recall_treats_duplicate_captions_as_relevant_to_every_image_that_has_them():
    texts, relevant = text_gallery([["two objects", "red"], ["two objects", "blue"]])
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_embeddings = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # "two objects" is nearest image 1
    m = retrieval_recall(images, text_embeddings, relevant, ks=(1,))
    assert m["t2i_r1"] == 100.0  # image 1 also has "two objects"


def test_recall_by_group_ranks_each_query_text_within_its_group():
    # the texts of test_recall_counts_rank_of_the_best_relevant_item: text 0 ranks its image 2nd, texts 1 and 2 1st
    images = torch.eye(3)
    texts = torch.tensor([[0.9, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    relevant = np.array([[True, False, False, False], [False, True, False, False], [False, False, True, False]])
    m = recall_of_scores(images @ texts.T, texts @ images.T, relevant, ks=(1, 2), text_groups=["a", "b", "a", "b"])
    assert {key: value for key, value in m.items() if "/" in key} == {
        "t2i_r1/a": 50.0,
        "t2i_r2/a": 100.0,
        "t2i_queries/a": 2.0,
        "t2i_r1/b": 100.0,  # text 3 is a distractor, no query: group b holds text 1 only
        "t2i_r2/b": 100.0,
        "t2i_queries/b": 1.0,
    }
    with pytest.raises(ValueError, match="3 groups for 4 texts"):
        recall_of_scores(images @ texts.T, texts @ images.T, relevant, text_groups=["a", "b", "a"])


def test_rerank_top_k_orders_each_querys_candidates_by_the_second_score_above_the_rest():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    second = torch.tensor([[0.0, 0.5, 1.0, 1.0], [1.0, 1.0, 0.2, 0.1]])  # favours items the first stage ranks low
    pairs = []

    def score_pairs(query, item):
        pairs.extend(zip(query.tolist(), item.tolist(), strict=True))
        return second[query, item]

    reranked = rerank_top_k(scores, 3, score_pairs)
    assert sorted(pairs) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]
    assert reranked[0].argsort(descending=True).tolist() == [2, 1, 0, 3]  # item 3 is no candidate: last
    assert reranked[1].argsort(descending=True).tolist() == [1, 2, 3, 0]
    only_row_1 = rerank_top_k(scores, 3, score_pairs, rows=torch.tensor([False, True]))
    assert torch.equal(only_row_1[0], scores[0]) and only_row_1[1].argsort(descending=True).tolist() == [1, 2, 3, 0]


def test_recall_of_scores_ranks_each_direction_by_its_own_scores():
    relevant = np.eye(2, dtype=bool)
    image_to_text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # each image's own text first
    text_to_image = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # each text's image last
    m = recall_of_scores(image_to_text, text_to_image, relevant, ks=(1,))
    assert (m["i2t_r1"], m["t2i_r1"]) == (100.0, 0.0)


def test_recall_rejects_a_relevance_matrix_of_another_shape():
    with pytest.raises(ValueError, match="not images x texts"):
        retrieval_recall(torch.eye(2), torch.eye(3), np.eye(2, dtype=bool))


# --- the loss across workers ----------------------------------------------------------------------------------------

WORLD = 2


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 8, 6, generator=generator, dtype=torch.float64).unbind(0)
    return torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)


def _negatives() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    negatives = torch.nn.functional.normalize(torch.randn(8, 6, generator=generator, dtype=torch.float64), dim=1)
    return negatives, torch.tensor([True, False, True, True, False, True, True, True])  # rows 1 and 4 have none


def _losses_and_grads(images, texts, negatives, has_negative, rank: int, world: int) -> dict[str, dict]:
    """open_clip's ClipLoss (``plain``) and ``contrastive_loss`` with hard negatives (``hard``), with gradients."""
    results = {}
    for kind in ("plain", "hard"):
        leaves = [t.clone().requires_grad_(True) for t in (images, texts, negatives)]
        if kind == "plain":
            loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(*leaves[:2], 10.0)
        else:
            scale = torch.tensor(10.0, dtype=torch.float64)
            loss = clip.contrastive_loss(*leaves[:2], scale, leaves[2], has_negative)
        loss.backward()
        results[kind] = {"loss": loss.detach(), **{f"grad{i}": leaf.grad for i, leaf in enumerate(leaves)}}
    return results


def _half_batch(rank: int, world: int) -> dict[str, dict]:
    return _losses_and_grads(*(t.chunk(world)[rank] for t in (*_features(), *_negatives())), rank, world)


@pytest.mark.slow
def test_two_workers_match_one_on_the_whole_batch_with_and_without_hard_negatives():
    per_worker = on_gloo_workers(_half_batch, world=WORLD)
    single = _losses_and_grads(*_features(), *_negatives(), rank=0, world=1)
    for kind, leaves in (("plain", ("grad0", "grad1")), ("hard", ("grad0", "grad1", "grad2"))):
        torch.testing.assert_close(sum(r[kind]["loss"] for r in per_worker) / WORLD, single[kind]["loss"])
        for name in leaves:  # DDP averages gradients over workers
            torch.testing.assert_close(torch.cat([r[kind][name] for r in per_worker]) / WORLD, single[kind][name])
    assert single["hard"]["grad2"][[1, 4]].abs().max() == 0  # a row without a hard negative adds no text
    assert single["hard"]["loss"] > single["plain"]["loss"]


def test_a_hard_negative_as_close_as_the_caption_halves_the_image_side():
    image = text = torch.tensor([[1.0, 0.0]])
    # one image, one text: the plain loss is 0; a negative equal to the text leaves the image 1/2 on its caption
    assert clip.contrastive_loss(image, text, torch.tensor(10.0)).item() == pytest.approx(0.0)
    with_negative = clip.contrastive_loss(image, text, torch.tensor(10.0), text.clone(), torch.tensor([True]))
    assert with_negative.item() == pytest.approx(math.log(2) / 2)
    without = clip.contrastive_loss(image, text, torch.tensor(10.0), text.clone(), torch.tensor([False]))
    assert without.item() == pytest.approx(0.0)


# --- the model on scenes --------------------------------------------------------------------------------------------


def test_preprocessor_tokenizes_one_of_each_rows_captions(scenes):
    rows = train_rows(scenes, 16)
    out = Preprocessor(tiny_config().data, train=True, seed=0)(rows)
    assert out["image"].shape == (16, 3, 64, 64) and out["text"].shape == (16, CONTEXT)
    for ids, captions in zip(out["text"], rows["captions"], strict=True):
        assert any((ids == candidate).all() for candidate in tokenize(list(captions), CONTEXT))


def test_two_steps_give_finite_losses_and_keep_the_logit_scale_bounded(scenes):
    torch.manual_seed(0)
    cfg = tiny_config(strategy_params={**TINY_CLIP, "init_temperature": 0.01, "max_logit_scale": 50.0})
    model = get_strategy("clip").build_model(cfg, 0, 3)
    batch = train_batch(scenes, 16, cfg.data)
    optimizer = build_optimizer(model, cfg.optim, 1e-2)
    losses, scales = [], []
    for step in range(2):
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        model.after_step(step + 1, 2)
        losses.append(out["loss"].item())
        scales.append(model.logit_scale.exp().item())
    assert all(math.isfinite(loss) for loss in losses)
    assert scales[0] == pytest.approx(50.0)  # 1 / 0.01 = 100, clamped to 50 after the first step
    assert scales[1] <= 50.0 + 1e-4
    assert set(out) == {"loss", "log/logit_scale", "log/positive_cosine"}


def test_attention_pool_trains_and_tells_apart_maps_that_differ_only_in_where_things_are(scenes):
    torch.manual_seed(0)
    cfg = tiny_config(strategy_params={**TINY_CLIP, "image_pool": "attention", "feature_grid": 4})
    model = get_strategy("clip").build_model(cfg, 0, 3)
    batch = train_batch(scenes, 8, cfg.data)
    before = model.visual_proj.pos_embed.detach().clone()
    optimizer = build_optimizer(model, cfg.optim, 1e-2)
    model(batch)["loss"].backward()
    optimizer.step()
    assert not torch.equal(model.visual_proj.pos_embed, before)  # the position embedding learns
    assert model.encode_image(batch["image"]).shape == (8, TINY_CLIP["embed_dim"])
    assert model.backbone(batch["image"]).ndim == 2  # the backbone alone still gives pooled features
    # the same features in mirrored places: equal under average pooling, told apart by the attention pool
    feature_map = torch.randn(1, model.backbone.num_features, 4, 4)
    mirrored = torch.cat([feature_map, feature_map.flip(-1)])
    torch.testing.assert_close(mirrored.mean((2, 3))[0], mirrored.mean((2, 3))[1])
    with torch.no_grad():
        pooled = model.visual_proj(mirrored)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


def test_hard_negatives_raise_the_loss_on_scenes_rows_and_need_negatives(scenes):
    batch = train_batch(scenes, 8, tiny_config().data)
    losses = {}
    for hard_negatives in (False, True):
        torch.manual_seed(0)
        cfg = tiny_config(strategy_params={**TINY_CLIP, "hard_negatives": hard_negatives})
        losses[hard_negatives] = get_strategy("clip").build_model(cfg, 0, 3)(batch)["loss"].item()
    assert batch["negative_text"].any(dim=1).all()  # every scenes row has a hard negative
    assert losses[True] > losses[False]  # each image's softmax over texts gains 8 more candidates
    without_negatives = {key: value for key, value in batch.items() if key != "negative_text"}
    with pytest.raises(ValueError, match="hard_negatives: the batch has no hard-negative captions"):
        get_strategy("clip").build_model(cfg, 0, 3)(without_negatives)


def test_attention_pool_is_refused_for_a_vit_naming_the_key():
    cfg = tiny_config(strategy_params={**TINY_CLIP, "image_pool": "attention"})
    cfg.model.backbone, cfg.model.stem_stride = "test_vit", None
    with pytest.raises(ValueError, match="image_pool: attention pools a convolutional feature map; test_vit"):
        get_strategy("clip").build_model(cfg, 0, 3)


def test_evaluation_reports_recall_both_ways_and_the_shuffled_baseline(scenes):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = get_strategy("clip").build_model(cfg, 0, 3).eval()
    images, annotations = load_split_annotated(scenes, "test")
    metrics = evaluate_retrieval(model, images, annotations, cfg.data, batch_size=16)
    assert {"i2t_r1", "t2i_r10", "rsum", "shuffled/t2i_r1", "shuffled/rsum"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"))


def test_image_text_inferencer_scores_texts_per_image(scenes):
    cfg = tiny_config()
    model = get_strategy("clip").build_model(cfg, 0, 3).eval()
    model.info = ModelInfo(
        name="clip-test", task="image_text", class_names=[], config=cfg, in_chans=3, image_size=(64, 64), source="t"
    )
    images, _ = load_split_annotated(scenes, "test")
    texts = ["a red circle", "a blue square", "there are two objects"]
    inferencer = ImageTextInferencer(model)
    results = inferencer(list(images[:3].transpose(0, 2, 3, 1)), texts=texts)
    assert len(results) == 3
    for result in results:
        assert result["scores"].shape == (3,) and result["scores"].sum() == pytest.approx(1.0, abs=1e-5)
        assert result["pred_text"] == texts[result["pred_index"]]
    one_by_one = inferencer(images[0].transpose(1, 2, 0), texts=texts)
    np.testing.assert_allclose(one_by_one[0]["scores"], results[0]["scores"], atol=1e-5)
    with pytest.raises(ValueError, match="non-empty list"):
        inferencer.encode_texts("a red circle")


def test_clip_needs_an_image_text_dataset_and_supervised_a_classification_one(project, scenes):
    with pytest.raises(DatasetError, match="is a classification dataset; strategy clip trains on retrieval or caption"):
        check_experiment(tiny_config(dataset="digits"))
    supervised = validate({"name": "s", "model": {"backbone": "test_resnet"}, "data": {"dataset": str(scenes)}})
    with pytest.raises(DatasetError, match="is a retrieval dataset; strategy supervised trains on classification"):
        check_experiment(supervised)
    hard_negatives = {**TINY_CLIP, "hard_negatives": True}
    check_experiment(tiny_config(dataset=str(scenes), strategy_params=hard_negatives))
    captions = str(scenes.parent / "caption")
    with pytest.raises(DatasetError, match=f"hard_negatives: {captions} is a caption dataset, without hard-negative"):
        check_experiment(tiny_config(dataset=captions, strategy_params=hard_negatives))


def test_scenes_config_builds_and_runs_a_step_on_a_batch(scenes):
    # the test set's 64 px images instead of the config's 96 px ones
    cfg = load_config(CONFIGS / "clip_resnet10t_scenes.yaml", ["data.train_pipeline=[{type: RandomCrop, size: 64}]"])
    model = get_strategy("clip").build_model(cfg, 0, 3)
    batch = train_batch(scenes, 4, cfg.data)
    assert math.isfinite(model(batch)["loss"].item())


# --- the evaluation jobs on a checkpoint ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_checkpoint(scenes, tmp_path_factory):
    """An untrained tiny CLIP checkpoint of the tiny scenes set."""
    cfg = tiny_config(dataset=str(scenes))
    torch.manual_seed(0)
    model = get_strategy("clip").build_model(cfg, 0, 3)
    info = {"class_names": [], "num_classes": 0, "in_chans": 3}
    folder = tmp_path_factory.mktemp("clip") / "checkpoint"
    return save_checkpoint(folder, model.state_dict(), checkpoint_meta(cfg, info, 1, 2, {}, None))


def test_evaluate_job_reports_recall_of_an_image_text_checkpoint(project, clip_checkpoint, capsys):
    assert evaluate_job.main([str(clip_checkpoint), "--split", "test", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "t2i_r1" in out and "shuffled/t2i_r1" in out and "t2i_r1/spatial_relation" in out


def test_scenes_evaluation_splits_text_to_image_recall_by_kind_of_caption(clip_checkpoint):
    metrics = evaluate_retrieval_split(load_model(str(clip_checkpoint)), "test", batch_size=16)
    queries = {key.split("/")[1]: n for key, n in metrics.items() if key.startswith("t2i_queries/")}
    assert set(queries) == set(CAPTION_KINDS)
    hits = sum(metrics[f"t2i_r5/{kind}"] * n for kind, n in queries.items())
    assert hits / sum(queries.values()) == pytest.approx(metrics["t2i_r5"])


def test_zero_shot_job_classifies_scenes_objects_by_shape(project, scenes, clip_checkpoint, capsys):
    grounding = scenes.parent / "grounding"
    assert zero_shot_job.main([str(clip_checkpoint), "--data", str(grounding), "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "7 prompts like 'a square'" in out and "chance 14.29%" in out
    data = labelled_images(grounding, "test", ["circle", "bag"])
    assert data.class_names == ["circle", "bag"] and set(data.labels.tolist()) <= {0, 1}
    assert all(image.ndim == 3 and image.shape[2] == 3 for image in data.images)


def test_zero_shot_job_names_a_missing_class_and_a_wrong_dataset(project, scenes, clip_checkpoint, capsys):
    grounding = str(scenes.parent / "grounding")
    assert zero_shot_job.main([str(clip_checkpoint), "--data", grounding, "--classes", "hexagon", "--no-mlflow"]) == 2
    assert "no class named 'hexagon'; classes: square, circle" in capsys.readouterr().err
    assert zero_shot_job.main([str(clip_checkpoint), "--data", str(scenes), "--no-mlflow"]) == 2
    assert "needs a classification or grounding dataset, not a retrieval one" in capsys.readouterr().err
