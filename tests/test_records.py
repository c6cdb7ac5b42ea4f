"""Records: one typed model per artifact line, validated where read; docs/formats.md matches the models.

``python tests/test_records.py`` prints the field tables of docs/formats.md from the models.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from mapd.errors import MapdError
from mapd.records import (ARTIFACTS, Rationale, Review, TeacherStats, TrainingPair, read_document,
                          read_mistakes, read_records, write_records)

REPO = Path(__file__).resolve().parents[1]
FORMATS = REPO / "docs" / "formats.md"
# every table of docs/formats.md: its heading, and the model it documents
DOCUMENTED: dict[str, type[BaseModel]] = {
    **{name: model for name, model in ARTIFACTS.items() if name != "teach_stats.json"},
    "teach_stats.json": TeacherStats,  # {teacher: one of these}
    "reviews": Review,  # the items of a rationale's reviews
}


def _type(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "enum" in schema:
        return " or ".join(f'"{value}"' for value in schema["enum"])
    if schema.get("type") == "array":
        return f"list of {_type(schema['items'])}"
    return schema.get("type", "any")


def field_table(model: type[BaseModel]) -> str:
    """The markdown table of ``model``'s fields, as docs/formats.md shows it."""
    properties = model.model_json_schema()["properties"]
    rows = [f"| `{name}` | {_type(schema)} | {schema['description']} |" for name, schema in properties.items()]
    return "\n".join(["| field | type | meaning |", "|---|---|---|", *rows])


def test_formats_md_documents_every_field_of_every_record():
    text = FORMATS.read_text(encoding="utf-8")
    for heading, model in DOCUMENTED.items():
        section = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^#|\Z)", text, re.M | re.S)
        assert section, f"docs/formats.md has no '### {heading}' section"
        assert field_table(model) in section.group(1), (
            f"docs/formats.md '### {heading}' is out of date; the table should be:\n{field_table(model)}")


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_integer_ids_are_stored_as_text(tmp_path):
    path = write_lines(tmp_path / "mistakes.jsonl", [{"id": 7, "question": "q", "gold": "3", "output": "o"}])
    (mistake,) = read_mistakes(path)
    assert mistake.id == "7" and mistake.status == "wrong" and mistake.answer is None
    write_records(tmp_path / "out.jsonl", [mistake])
    assert json.loads((tmp_path / "out.jsonl").read_text())["id"] == "7"


@pytest.mark.parametrize("line, message", [
    ({"id": "a", "teacher": "t", "text": "x", "accepted": "false"}, r"r\.jsonl:2: field 'accepted': Input should be a valid boolean"),
    ({"id": True, "teacher": "t", "text": "x", "accepted": False}, r"r\.jsonl:2: field 'id': Input should be a valid string"),
    ({"id": "a", "teacher": "t", "accepted": False}, r"r\.jsonl:2: field 'text': missing"),
    ({"id": "a", "teacher": "t", "text": "x", "accepted": True, "reviews": [{"reviewer": "u", "score": 9, "raw": "[9]"}]},
     r"r\.jsonl:2: field 'reviews\.0\.score': Input should be less than or equal to 5"),
])
def test_a_bad_field_names_file_line_and_field(tmp_path, line, message):
    good = {"id": "z", "teacher": "t", "text": None, "error": "boom", "accepted": False}
    path = write_lines(tmp_path / "r.jsonl", [good, line])
    with pytest.raises(MapdError, match=message):
        read_records(path, Rationale)


def test_mistakes_must_be_unique_and_present(tmp_path):
    line = {"id": 1, "question": "q", "gold": "3", "output": "o"}
    with pytest.raises(MapdError, match=r"m\.jsonl:3: field 'id': '1' already on line 1"):
        read_mistakes(write_lines(tmp_path / "m.jsonl", [line, "", {**line, "id": "1"}]))
    with pytest.raises(MapdError, match=r"empty\.jsonl: no mistakes"):
        read_mistakes(write_lines(tmp_path / "empty.jsonl", ["  "]))


def test_pairs_and_documents(tmp_path):
    pair = TrainingPair(id="1", kind="feedback", teacher="t", system="Be brief.", prompt="p", completion="c")
    assert pair.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "p"}]
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "svamp", "split": "test", "model": "m", "n": 2}))
    with pytest.raises(MapdError, match=r"metrics\.json: field 'accuracy': missing"):
        read_document(tmp_path / "metrics.json", ARTIFACTS["metrics.json"])


if __name__ == "__main__":
    for heading, model in DOCUMENTED.items():
        sys.stdout.write(f"### {heading}\n\n{field_table(model)}\n\n")
