"""Image-text formats (COCO captions, VQAv2, RefCOCO, Karpathy splits) on JSON fixtures in the real layouts."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prepare_data import main
from test_formats import save_image, shard_hashes

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.prepare import convert
from pretrainlab.data.shards import load_manifest, shard_paths


def write_json(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def rows(converted, split) -> list[dict]:
    return sorted(converted.splits[split].to_pylist(), key=lambda row: row["source_id"])


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    for set_name, ids in (("train2017", (1, 2)), ("val2017", (7,))):
        for image_id in ids:
            save_image(root / set_name / f"{image_id:012d}.jpg", value=image_id)
        write_json(
            root / "annotations" / f"captions_{set_name}.json",
            {
                "info": {},
                "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 5, "width": 6} for i in ids],
                "annotations": [
                    {"id": 100 * i + k, "image_id": i, "caption": f" image {i} caption {k}\n"}
                    for i in ids
                    for k in (2, 1)
                ],
            },
        )
    return root


def test_coco_captions_one_row_per_image_with_all_captions(coco):
    converted = convert("coco_captions", coco)
    assert converted.task == "caption" and converted.class_names == []
    assert {s: t.num_rows for s, t in converted.splits.items()} == {"train": 2, "val": 1}
    first = rows(converted, "train")[0]
    assert first["source_id"] == "train2017/000000000001.jpg" and first["image_format"] == "jpeg"
    assert first["captions"] == ["image 1 caption 1", "image 1 caption 2"]
    assert first["image"] == (coco / "train2017/000000000001.jpg").read_bytes()


def test_coco_captions_single_file_split_and_images_option(coco, tmp_path):
    converted = convert("coco_captions", coco / "annotations/captions_val2017.json", split="minival")
    assert list(converted.splits) == ["minival"] and converted.splits["minival"].num_rows == 1
    (tmp_path / "moved").mkdir()
    (coco / "val2017").rename(tmp_path / "moved/val2017")
    moved = convert("coco_captions", coco / "annotations/captions_val2017.json", images=tmp_path / "moved")
    assert moved.splits["val"].num_rows == 1


def test_coco_missing_image_and_unknown_image_id_are_named(coco):
    (coco / "val2017/000000000007.jpg").unlink()
    with pytest.raises(DatasetError, match=r"captions_val2017.json \(image_id 7\): image .*000000000007.jpg: file not"):
        convert("coco_captions", coco)
    path = coco / "annotations/captions_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 999, "image_id": 55, "caption": "ghost"})
    data["images"][1]["file_name"] = "../../outside.jpg"
    write_json(path, data)
    converted = convert("coco_captions", coco, skip_bad=True)
    assert [(s["file"].split("/")[-1], s["entry"]) for s in converted.skipped] == [
        ("captions_train2017.json", "annotations[4]"),
        ("captions_train2017.json", "image_id 2"),
        ("captions_val2017.json", "image_id 7"),
    ]
    assert "escapes the source folder" in converted.skipped[1]["reason"]
    assert list(converted.splits) == ["train"] and converted.metadata["skipped"] == 3


def test_malformed_json_names_file_and_line(coco):
    (coco / "annotations/captions_val2017.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"captions_val2017.json: not valid JSON \(line 2 column 12"):
        convert("coco_captions", coco)


@pytest.fixture
def vqa(tmp_path):
    root = tmp_path / "vqa"
    questions, annotations = [], []
    for image_id, qids in ((42, (3, 1)), (9, (5,))):
        save_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", value=image_id)
        for qid in qids:
            questions.append({"image_id": image_id, "question": f"What is {qid}?", "question_id": qid})
            answers = ["yes"] * 6 + ["no"] * 3 + [f"maybe {qid}"]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": "is this",
                    "answer_type": "yes/no",
                    "multiple_choice_answer": "yes",
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)
                    ],
                }
            )
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": questions})
    write_json(root / "v2_mscoco_val2014_annotations.json", {"data_subtype": "val2014", "annotations": annotations})
    return root


def test_vqav2_rows_hold_every_question_and_answer(vqa):
    converted = convert("vqav2", vqa)
    assert converted.task == "vqa" and list(converted.splits) == ["val"]
    row = rows(converted, "val")[1]
    assert row["source_id"] == "val2014/COCO_val2014_000000000042.jpg"
    assert [q["question_id"] for q in row["questions"]] == ["1", "3"]
    assert row["questions"][0]["question"] == "What is 1?" and row["questions"][0]["question_type"] == "is this"
    assert row["questions"][1]["answers"] == ["yes"] * 6 + ["no"] * 3 + ["maybe 3"]
    assert converted.metadata["answer_vocab"] == ["yes", "no", "maybe 1", "maybe 3", "maybe 5"]


def test_vqav2_unanswered_questions_and_test_files_are_bad_entries(vqa):
    path = vqa / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(path.read_text())
    data["questions"].append({"image_id": 42, "question": "Orphan?", "question_id": 77})
    write_json(path, data)
    write_json(vqa / "v2_OpenEnded_mscoco_test2015_questions.json", {"data_subtype": "test2015", "questions": []})
    with pytest.raises(
        DatasetError, match=r"test2015_questions.json: no annotations JSON with data_subtype 'test2015'"
    ):
        convert("vqav2", vqa)
    converted = convert("vqav2", vqa, skip_bad=True)
    assert [s["entry"] for s in converted.skipped] == ["", "questions[3]"]
    assert "question_id 77 has no annotation" in converted.skipped[1]["reason"]
    assert sum(len(r["questions"]) for r in converted.splits["val"].to_pylist()) == 3


@pytest.fixture
def refcoco(tmp_path):
    src = tmp_path / "refcoco"
    save_image(src / "images/COCO_train2014_000000000011.jpg", size=(6, 5))
    save_image(src / "images/COCO_train2014_000000000012.jpg", size=(8, 8), value=3)
    write_json(
        src / "instances.json",
        {
            "images": [
                {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "width": 6, "height": 5},
                {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "width": 8, "height": 8},
            ],
            "annotations": [
                {"id": 500, "image_id": 11, "bbox": [1, 1, 3, 3], "category_id": 1},
                {"id": 501, "image_id": 11, "bbox": [0.0, 0.5, 6.4, 4.5], "category_id": 2},
                {"id": 502, "image_id": 12, "bbox": [2, 2, 2, 2], "category_id": 1},
            ],
            "categories": [{"id": 2, "name": "dog"}, {"id": 1, "name": "person"}],
        },
    )
    sentence = [{"sent": "the man on the left", "raw": "The man on the left.", "tokens": [], "sent_id": 1}]
    write_json(
        src / "refs(unc).json",
        [
            {"ref_id": 2, "ann_id": 501, "image_id": 11, "split": "train", "category_id": 2, "sentences": sentence},
            {"ref_id": 1, "ann_id": 500, "image_id": 11, "split": "train", "category_id": 1, "sentences": sentence * 2},
            {"ref_id": 3, "ann_id": 502, "image_id": 12, "split": "testA", "category_id": 1, "sentences": sentence},
        ],
    )
    return src


def test_refcoco_boxes_become_pixel_xyxy(refcoco):
    converted = convert("refcoco", refcoco, images=refcoco / "images")
    assert converted.task == "grounding" and converted.metadata["categories"] == ["person", "dog"]
    assert {s: t.num_rows for s, t in converted.splits.items()} == {"train": 1, "testA": 1}
    refs = rows(converted, "train")[0]["refs"]
    assert [r["ref_id"] for r in refs] == ["1", "2"]
    assert refs[0] == {
        "ref_id": "1",
        "expressions": ["the man on the left"] * 2,
        "box": [1, 1, 4, 4],
        "category": "person",
    }
    assert refs[1]["box"] == [0.0, 0.5, 6.0, 5.0]  # 6.4 leaves the 6-pixel image by < 1 pixel: clipped


def test_refcoco_bad_box_missing_annotation_and_pickle(refcoco, tmp_path):
    path = refcoco / "instances.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [1, 1, 9, 3]
    data["annotations"].pop()
    write_json(path, data)
    with pytest.raises(DatasetError, match=r"refs\(unc\).json \(refs\[1\]\): bbox \[1, 1, 9, 3\] is empty or outside"):
        convert("refcoco", refcoco, images=refcoco / "images")
    converted = convert("refcoco", refcoco, images=refcoco / "images", skip_bad=True)
    assert [s["entry"] for s in converted.skipped] == ["refs[1]", "refs[2]"]
    assert "ann_id 502 is not an annotation" in converted.skipped[1]["reason"]

    (refcoco / "refs(unc).json").rename(refcoco / "refs(unc).p")
    with pytest.raises(DatasetError, match=r"refs\(unc\).p: refs pickles are not loaded .*convert it to JSON"):
        convert("refcoco", refcoco)
    with pytest.raises(DatasetError, match="refs pickles are not loaded"):
        convert("refcoco", refcoco / "refs(unc).p")


def test_refcoco_job_resizes_images_and_boxes(refcoco, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["refcoco", str(refcoco), str(out), "--images", str(refcoco / "images"), "--image-size", "10"]
    assert main(args) == 0
    row = pq.read_table(shard_paths(out, "train")[0]).to_pylist()[0]
    assert (row["image_format"], row["width"], row["height"]) == ("png", 12, 10)
    assert [r["box"] for r in row["refs"]] == [[2, 2, 8, 8], [0, 1, 12, 10]]
    assert load_manifest(out)["metadata"]["categories"] == ["person", "dog"]
    assert main(["refcoco", str(refcoco), str(tmp_path / "no_images")]) == 2
    assert "COCO_train2014_000000000012.jpg: file not found" in capsys.readouterr().err


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "karpathy"
    images = []
    for i, (folder, split) in enumerate((("val2014", "restval"), ("val2014", "test"), ("train2014", "train"))):
        save_image(root / folder / f"im{i}.jpg", value=i)
        sentences = [{"raw": f"A photo {i}.", "tokens": ["a", "photo"], "sentid": 2 * i}, {"raw": "Another one."}]
        images.append(
            {"filepath": folder, "filename": f"im{i}.jpg", "split": split, "imgid": i, "sentences": sentences}
        )
    write_json(root / "dataset_coco.json", {"dataset": "coco", "images": images})
    return root


def test_karpathy_splits_and_captions(karpathy, tmp_path):
    converted = convert("karpathy", karpathy)
    assert converted.task == "retrieval"
    assert {s: t.num_rows for s, t in converted.splits.items()} == {"test": 1, "train": 2}
    train = rows(converted, "train")
    assert [r["source_id"] for r in train] == ["train2014/im2.jpg", "val2014/im0.jpg"]
    assert train[1]["captions"] == ["A photo 0.", "Another one."] and train[1]["negatives"] == []
    assert main(["karpathy", str(karpathy), str(tmp_path / "a"), "--shard-size", "1"]) == 0
    assert main(["karpathy", str(karpathy / "dataset_coco.json"), str(tmp_path / "b"), "--shard-size", "1"]) == 0
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b") and len(shard_hashes(tmp_path / "a")) == 3


def test_karpathy_path_traversal_and_bad_split(karpathy):
    data = json.loads((karpathy / "dataset_coco.json").read_text())
    data["images"][0]["filename"] = "../../x.png"
    data["images"][1]["split"] = "holdout"
    write_json(karpathy / "dataset_coco.json", data)
    with pytest.raises(DatasetError, match=r"dataset_coco.json \(images\[1\]\): split 'holdout' is not one of"):
        convert("karpathy", karpathy)
    converted = convert("karpathy", karpathy, skip_bad=True)
    assert [(s["entry"], s["reason"].split(" escapes")[0]) for s in converted.skipped] == [
        ("images[1]", "split 'holdout' is not one of train, restval, val, test"),
        ("images[0]", "path 'val2014/../../x.png'"),
    ]
    assert pa.concat_tables(converted.splits.values()).num_rows == 1
