from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.calibration import read_texts, split
from edgepack.errors import UserError


def test_txt_jsonl_csv_read_the_same_texts(tmp_path: Path) -> None:
    texts = ["first text", "second, with a comma", 'third "quoted"']
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    import csv

    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "body"])
        writer.writerows([[i, t] for i, t in enumerate(texts)])
    assert read_texts(tmp_path / "a.txt").texts == tuple(texts)
    assert read_texts(tmp_path / "a.jsonl", "body").texts == tuple(texts)
    assert read_texts(tmp_path / "a.csv", "body").texts == tuple(texts)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"\n\n", "holds no texts"),
        ("bin.txt", b"\x00\x01\x02abc", "looks binary"),
        ("latin.txt", "caf\u00e9 au lait\n".encode("latin-1"), "not UTF-8"),
        ("x.jsonl", b'{"other": "x"}\n', "no field 'text'"),
        ("y.jsonl", b"{not json\n", "not valid JSON"),
        ("z.csv", b"id,body\n1,hello\n", "no column 'text'; columns are: id, body"),
        ("w.parquet", b"PAR1", "unsupported format"),
    ],
)
def test_bad_text_files_get_one_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        read_texts(path)
    assert "\n" not in str(info.value)


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"text {i}" for i in range(50)))
    pool = read_texts(path)
    a, rest = split(pool, 20, seed=1)
    b, _ = split(pool, 20, seed=1)
    c, _ = split(pool, 20, seed=2)
    assert a.texts == b.texts and a.sha256 == b.sha256
    assert a.texts != c.texts
    assert not set(a.texts) & set(rest.texts)
    assert len(a.texts) + len(rest.texts) == 50


def test_fewer_texts_than_samples(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(UserError, match="has 2 texts, fewer than --samples 5"):
        split(read_texts(path), 5, 0)
