"""The prompt sets the TP-GRPO paper trained and evaluated on, pinned and verified by git blob hash.

The only exact copies of the paper's prompt sets are the files of the authors' public repository at
:data:`PUBLISHED_COMMIT`. Rebuilding them from their sources does not give the same files (the
PickScore split was shuffled without a seed), so `prepare_data --source published` copies those
files byte for byte: fetched from GitHub at the pinned commit, or read from a clone or a folder with
`--from DIR`. Every file's git blob hash (what `git hash-object` prints) is checked before anything
is written; a mismatch is refused with the file and both hashes named.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PUBLISHED_COMMIT",
    "PUBLISHED_FILES",
    "PUBLISHED_REPOSITORY",
    "PublishedFile",
    "PublishedHashError",
    "collect_published",
    "git_blob_sha1",
    "raw_url",
    "write_published",
]

PUBLISHED_REPOSITORY = "YunzeTong/TurningPoint-GRPO"
"""GitHub repository of the paper's code and prompt sets."""
PUBLISHED_COMMIT = "994d26a63b65dbeba3260286317c137453cf3070"
"""The commit whose prompt files the paper's numbers come from."""


@dataclass(frozen=True)
class PublishedFile:
    """One published prompt file: its path in the repository and its git blob SHA-1."""

    path: str
    sha1: str

    @property
    def relative(self) -> Path:
        """The path under the dataset folder, e.g. `pickscore_sfw/train.txt`."""
        return Path(self.path).relative_to("dataset")


PUBLISHED_FILES: tuple[PublishedFile, ...] = (
    PublishedFile("dataset/pickscore_sfw/train.txt", "702338a757b3d434c7ba4319c65d11f78e3ee43f"),
    PublishedFile("dataset/pickscore_sfw/test.txt", "bda69556a75a37a5542d2961852573d9df2e1245"),
    PublishedFile("dataset/geneval/train_metadata.jsonl", "0b97e8a6802c08fc7537cd00c76ae79c851bddcb"),
    PublishedFile("dataset/geneval/test_metadata.jsonl", "27cdaf5cc1356fe15aeadbb8df55682ca74228f0"),
    PublishedFile("dataset/ocr/train.txt", "3ce0521b77b0a9031191d66ecc36ebaaf27a3922"),
    PublishedFile("dataset/ocr/test.txt", "8deb4f8d8f2e863f45353354243669b3c991a6a2"),
    PublishedFile("dataset/drawbench/test.txt", "8d96e7cf7017ce6ce299a6eec96e21467a2ac7aa"),
)
"""The files `--source published` writes, with the hashes they must have."""


class PublishedHashError(ValueError):
    """A published file's bytes do not have the pinned git blob hash."""


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file with these bytes: SHA-1 of `b"blob <size>\\0" + content` (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def raw_url(path: str, commit: str = PUBLISHED_COMMIT, repository: str = PUBLISHED_REPOSITORY) -> str:
    """The raw download URL of `path` at `commit` of `repository` on GitHub."""
    return f"https://raw.githubusercontent.com/{repository}/{commit}/{path}"


def _download(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError as error:
        raise RuntimeError(
            f"could not download {url} ({error}). On a machine without network, clone "
            f"https://github.com/{PUBLISHED_REPOSITORY} elsewhere, check out {PUBLISHED_COMMIT}, copy it here "
            "and pass --from <clone>."
        ) from error


def _read_local(folder: Path, entry: PublishedFile) -> bytes:
    """The bytes of `entry` in a clone (`folder/dataset/...`) or a dataset folder (`folder/pickscore_sfw/...`)."""
    candidates = (folder / entry.path, folder / entry.relative)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_bytes()
    raise FileNotFoundError(
        f"{entry.path} is not in --from {folder}: looked for {candidates[0]} and {candidates[1]}"
    )


def collect_published(source_dir: str | os.PathLike[str] | None = None) -> dict[PublishedFile, bytes]:
    """Every published file's bytes, each checked against its pinned hash.

    Args:
        source_dir: a clone of the repository or a folder laid out like `dataset/`; None downloads
            the files from GitHub at :data:`PUBLISHED_COMMIT`.

    Raises:
        PublishedHashError: naming the file, the expected and the actual hash.
        FileNotFoundError: a file missing from `source_dir`.
        RuntimeError: a download failed.
    """
    contents = {}
    for entry in PUBLISHED_FILES:
        content = _read_local(Path(source_dir), entry) if source_dir is not None else _download(raw_url(entry.path))
        actual = git_blob_sha1(content)
        if actual != entry.sha1:
            origin = f"--from {source_dir}" if source_dir is not None else raw_url(entry.path)
            raise PublishedHashError(
                f"{entry.path} from {origin} has git blob hash {actual}, but the published file at commit "
                f"{PUBLISHED_COMMIT} has {entry.sha1}; it is not the paper's prompt set (check out that commit, "
                "or use another --source for a prompt set of your own)"
            )
        contents[entry] = content
    return contents


def _count_lines(content: bytes) -> int:
    return sum(1 for line in content.decode("utf-8").splitlines() if line.strip())


def write_published(
    out_dir: str | os.PathLike[str], contents: dict[PublishedFile, bytes], origin: str, overwrite: bool = False
) -> list[Path]:
    """Write the verified files under `out_dir` (`out_dir/pickscore_sfw/train.txt`, ...) with a `prepare_data.json` per folder.

    Each `prepare_data.json` records the repository, commit, origin and, per file, its repository
    path and git blob hash. Nothing is written when a target exists and `overwrite` is False.

    Raises:
        FileExistsError: naming the existing files.
    """
    out = Path(out_dir)
    targets = {entry: out / entry.relative for entry in contents}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"prompt files already exist: {', '.join(existing)}; pass --overwrite to replace them")
    folders: dict[Path, dict[str, Any]] = {}
    for entry, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[entry])
        record = folders.setdefault(
            path.parent,
            {"source": "published", "repository": f"https://github.com/{PUBLISHED_REPOSITORY}",
             "commit": PUBLISHED_COMMIT, "origin": origin, "files": {}},
        )
        record["files"][path.name] = {"path": entry.path, "git_blob_sha1": entry.sha1, "prompts": _count_lines(contents[entry])}
        split = path.name.split("_")[0].removesuffix(".txt")
        record[f"num_{split}"] = record["files"][path.name]["prompts"]
    for folder, record in folders.items():
        (folder / "prepare_data.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return list(targets.values())
