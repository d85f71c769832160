"""Row checks of the image-text schemas in write_dataset, and casts of same-shape nested types."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.shards import SCHEMAS, shard_paths, write_dataset

IMAGE = {"image": b"\x00" * 12, "image_format": "raw", "height": 2, "width": 2, "channels": 3}


def write(tmp_path, task: str, rows: list[dict], schema: pa.Schema | None = None) -> dict:
    rows = [{**IMAGE, **row, "split": "train", "source_id": f"src:{i}"} for i, row in enumerate(rows)]
    table = pa.Table.from_pylist(rows, schema=schema or SCHEMAS[task])
    return write_dataset(tmp_path / "ds", {"train": table}, name="t", task=task, class_names=[])


def question(**changes) -> dict:
    return {"question_id": "1", "question": "What?", "answers": ["yes"], "question_type": None, **changes}


def ref(**changes) -> dict:
    return {"ref_id": "1", "expressions": ["the left one"], "box": [0.0, 0.0, 2.0, 2.0], "category": None, **changes}


@pytest.mark.parametrize(
    ("task", "row", "problem"),
    [
        ("caption", {"captions": []}, "field 'captions' is empty or holds a blank caption"),
        ("caption", {"captions": ["ok", "  "]}, "field 'captions' is empty or holds a blank caption"),
        ("caption", {"captions": ["ok", None]}, "field 'captions' is empty or holds a blank caption"),
        (
            "retrieval",
            {"captions": ["ok"], "negatives": [""], "also_true": []},
            "field 'negatives' holds a blank caption",
        ),
        (
            "retrieval",
            {"captions": ["ok"], "negatives": [], "also_true": [" "]},
            "field 'also_true' holds a blank caption",
        ),
        ("vqa", {"questions": []}, "field 'questions' is empty"),
        (
            "vqa",
            {"questions": [question(), question(answers=[])]},
            "field 'questions': a question has no answers or a blank answer",
        ),
        ("vqa", {"questions": [question(question="")]}, "field 'questions': a question text is blank"),
        (
            "vqa",
            {"questions": [question(question_id=None)]},
            "field 'questions': a question is null or has a null question_id",
        ),
        ("grounding", {"refs": []}, "field 'refs' is empty"),
        ("grounding", {"refs": [ref(expressions=[])]}, "field 'refs': a ref has no expressions or a blank expression"),
        (
            "grounding",
            {"refs": [ref(box=[0.0, 0.0, 2.5, 2.0])]},
            "field 'refs': a box is not finite with 0 <= x1 < x2 <= width",
        ),
        ("grounding", {"refs": [ref(box=[1.0, 0.0, 1.0, 2.0])]}, "field 'refs': a box is not finite"),
        ("grounding", {"refs": [ref(box=[-0.5, 0.0, 1.0, 2.0])]}, "field 'refs': a box is not finite"),
        ("grounding", {"refs": [ref(box=[0.0, math.nan, 1.0, 2.0])]}, "field 'refs': a box is not finite"),
        ("grounding", {"refs": [ref(box=[0.0, 0.0, 1.0, 3.0])]}, "field 'refs': a box is not finite"),
    ],
)
def test_bad_image_text_rows_name_split_row_source_and_field(tmp_path, task, row, problem):
    good = {
        "caption": {"captions": ["ok"]},
        "retrieval": {"captions": ["ok"], "negatives": [], "also_true": []},
        "vqa": {"questions": [question()]},
        "grounding": {"refs": [ref()]},
    }[task]
    write(tmp_path, task, [good])
    with pytest.raises(DatasetError, match=rf"split 'train' row 1 \(source_id 'src:1'\): {problem}"):
        write(tmp_path, task, [good, row])


def test_same_shape_types_are_cast_to_the_schema(tmp_path):
    rows = [{**IMAGE, "split": "train", "source_id": "s", "refs": [ref(box=[0, 0, 2, 2])]}]
    table = pa.Table.from_pylist(rows)  # then large strings and lists, int64 boxes, a null-typed category
    table = table.set_column(
        table.schema.get_field_index("refs"),
        "refs",
        table.column("refs").cast(
            pa.large_list(
                pa.struct(
                    [
                        ("ref_id", pa.large_string()),
                        ("expressions", pa.large_list(pa.large_string())),
                        ("box", pa.list_(pa.int64())),
                        ("category", pa.null()),
                    ]
                )
            )
        ),
    )
    write_dataset(tmp_path / "ds", {"train": table}, name="t", task="grounding", class_names=[])
    back = pq.read_table(shard_paths(tmp_path / "ds", "train")[0])
    assert back.schema.equals(SCHEMAS["grounding"]) and back.column("refs")[0][0]["box"].as_py() == [0, 0, 2, 2]


def test_other_shapes_are_refused(tmp_path):
    rows = [{**IMAGE, "split": "train", "source_id": "s", "captions": "one caption"}]
    with pytest.raises(DatasetError, match="field 'captions' has type string, expected list<item: string>"):
        write_dataset(tmp_path / "ds", {"train": pa.Table.from_pylist(rows)}, name="t", task="caption", class_names=[])
    rows = [{**IMAGE, "split": "train", "source_id": "s", "refs": [ref(box=[0.0, 0.0, 2.0])]}]
    with pytest.raises(DatasetError, match="field 'refs' does not fit"):
        write_dataset(
            tmp_path / "ds", {"train": pa.Table.from_pylist(rows)}, name="t", task="grounding", class_names=[]
        )
