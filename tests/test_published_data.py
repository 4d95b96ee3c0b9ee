"""`prepare_data --source published`: git blob hashes, byte-for-byte copies, refusal of changed files."""

from __future__ import annotations

import json
import subprocess

import pytest

from flow_grpo.commands import prepare_data
from flow_grpo.paper import published
from flow_grpo.paper.published import PublishedFile, git_blob_sha1

_CONTENTS = {
    "dataset/pickscore_sfw/train.txt": b"a cat wearing a tiny hat on a sunny day\nsecond prompt\n",
    "dataset/pickscore_sfw/test.txt": b"a test prompt\n",
    "dataset/geneval/train_metadata.jsonl": b'{"prompt": "a photo of a dog", "tag": "single_object"}\n',
    "dataset/geneval/test_metadata.jsonl": b'{"prompt": "a photo of a cat", "tag": "single_object"}\n',
    "dataset/ocr/train.txt": b'a sign that says "hello"\n',
    "dataset/ocr/test.txt": b'a sign that says "bye"\r\nno final newline',
    "dataset/drawbench/test.txt": "caf\u00e9 at night\n".encode(),
}


@pytest.fixture
def pinned(monkeypatch) -> dict[str, bytes]:
    """Pin the test contents' hashes in place of the published ones."""
    files = tuple(PublishedFile(path, git_blob_sha1(content)) for path, content in _CONTENTS.items())
    monkeypatch.setattr(published, "PUBLISHED_FILES", files)
    return _CONTENTS


def _clone(root, contents) -> None:
    for path, content in contents.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)


def test_git_blob_sha1_matches_git_hash_object(tmp_path) -> None:
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    for content in (b"hello\n", b"no newline", b"crlf\r\n\x00binary\xff", "\u00e9\n".encode()):
        file = tmp_path / "file"
        file.write_bytes(content)
        done = subprocess.run(["git", "hash-object", "--no-filters", str(file)], capture_output=True, text=True, check=True)
        assert git_blob_sha1(content) == done.stdout.strip()


def test_published_from_a_clone_copies_byte_for_byte(tmp_path, pinned) -> None:
    clone, out = tmp_path / "clone", tmp_path / "out"
    _clone(clone, pinned)
    prepare_data.main(["--source", "published", "--from", str(clone), "--out", str(out)])
    for path, content in pinned.items():
        assert (out / path.removeprefix("dataset/")).read_bytes() == content
    record = json.loads((out / "geneval" / "prepare_data.json").read_text())
    assert record["commit"] == published.PUBLISHED_COMMIT and record["source"] == "published"
    assert record["files"]["test_metadata.jsonl"]["git_blob_sha1"] == git_blob_sha1(pinned["dataset/geneval/test_metadata.jsonl"])
    assert record["num_train"] == 1 and record["num_test"] == 1
    assert json.loads((out / "drawbench" / "prepare_data.json").read_text())["num_test"] == 1


def test_published_from_a_dataset_folder(tmp_path, pinned) -> None:
    folder, out = tmp_path / "copy", tmp_path / "out"
    _clone(folder, {path.removeprefix("dataset/"): content for path, content in pinned.items()})
    prepare_data.main(["--source", "published", "--from", str(folder), "--out", str(out)])
    assert (out / "ocr" / "test.txt").read_bytes() == pinned["dataset/ocr/test.txt"]


def _error(capsys, argv: list[str]) -> str:
    """The one `error:` line of `flow-grpo-prepare-data argv`, which must exit with code 2."""
    with pytest.raises(SystemExit) as raised:
        prepare_data.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert raised.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_changed_file_is_refused_and_nothing_is_written(tmp_path, pinned, capsys) -> None:
    clone, out = tmp_path / "clone", tmp_path / "out"
    changed = dict(pinned)
    changed["dataset/ocr/train.txt"] = pinned["dataset/ocr/train.txt"].replace(b"hello", b"hellO")
    _clone(clone, changed)
    message = _error(capsys, ["--source", "published", "--from", str(clone), "--out", str(out)])
    assert "dataset/ocr/train.txt" in message
    assert git_blob_sha1(changed["dataset/ocr/train.txt"]) in message
    assert git_blob_sha1(pinned["dataset/ocr/train.txt"]) in message
    assert not out.exists()


def test_a_missing_file_names_where_it_was_looked_for(tmp_path, pinned, capsys) -> None:
    clone = tmp_path / "clone"
    _clone(clone, {path: content for path, content in pinned.items() if "drawbench" not in path})
    message = _error(capsys, ["--source", "published", "--from", str(clone), "--out", str(tmp_path / "out")])
    assert "dataset/drawbench/test.txt is not in --from" in message


def test_existing_files_are_kept_without_overwrite(tmp_path, pinned, capsys) -> None:
    clone, out = tmp_path / "clone", tmp_path / "out"
    _clone(clone, pinned)
    (out / "ocr").mkdir(parents=True)
    (out / "ocr" / "test.txt").write_text("mine\n")
    assert "--overwrite" in _error(capsys, ["--source", "published", "--from", str(clone), "--out", str(out)])
    assert (out / "ocr" / "test.txt").read_text() == "mine\n" and not (out / "pickscore_sfw").exists()
    prepare_data.main(["--source", "published", "--from", str(clone), "--out", str(out), "--overwrite"])
    assert (out / "ocr" / "test.txt").read_bytes() == pinned["dataset/ocr/test.txt"]


def test_download_reads_the_pinned_commit(tmp_path, pinned, monkeypatch) -> None:
    urls = []

    def fake_download(url: str, timeout: float = 60.0) -> bytes:
        urls.append(url)
        return pinned[url.split(f"/{published.PUBLISHED_COMMIT}/", 1)[1]]

    monkeypatch.setattr(published, "_download", fake_download)
    prepare_data.main(["--source", "published", "--out", str(tmp_path)])
    assert len(urls) == len(pinned)
    assert all(url.startswith(f"https://raw.githubusercontent.com/{published.PUBLISHED_REPOSITORY}/") for url in urls)
    assert (tmp_path / "pickscore_sfw" / "train.txt").read_bytes() == pinned["dataset/pickscore_sfw/train.txt"]
    assert json.loads((tmp_path / "ocr" / "prepare_data.json").read_text())["origin"] == "github"


def test_the_pinned_hashes_are_the_published_ones() -> None:
    hashes = {entry.path: entry.sha1 for entry in published.PUBLISHED_FILES}
    assert hashes["dataset/pickscore_sfw/test.txt"] == "bda69556a75a37a5542d2961852573d9df2e1245"
    assert hashes["dataset/drawbench/test.txt"] == "8d96e7cf7017ce6ce299a6eec96e21467a2ac7aa"
    assert len(hashes) == 7 and published.PUBLISHED_COMMIT == "994d26a63b65dbeba3260286317c137453cf3070"
