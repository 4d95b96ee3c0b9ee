"""Build the prompt sets `dataset/<name>/` that the presets read, from public prompt sources.

The `flow-grpo-prepare-data` command; from a checkout, `python scripts/prepare_data.py`:

    python scripts/prepare_data.py --source published         # the paper's exact sets (pickscore_sfw, geneval, ocr, drawbench)
    python scripts/prepare_data.py --source published --from ~/TurningPoint-GRPO   # the same from a local clone
    python scripts/prepare_data.py --source pickapic_sfw      # -> dataset/pickscore_sfw/train.txt, test.txt
    python scripts/prepare_data.py --source pickapic          # -> dataset/pickapic/train.txt, test.txt
    python scripts/prepare_data.py --source geneval           # -> dataset/geneval/{train,test}_metadata.jsonl
    python scripts/prepare_data.py --source ocr               # -> dataset/ocr/train.txt, test.txt
    python scripts/prepare_data.py --source files --inputs my_prompts.txt,more.jsonl --name custom

Sources (all but `files` and `published --from` need network access):

- `published`: the prompt sets the TP-GRPO paper used, copied byte for byte from the authors'
  repository at a pinned commit (`flow_grpo.paper.published`): `pickscore_sfw/`, `geneval/`,
  `ocr/` and `drawbench/` under `--out`. Each file's git blob hash is checked before anything is
  written. `--from DIR` reads a clone (or a folder laid out like its `dataset/`) instead of
  downloading. This is the source that reproduces the paper; the others are alternatives.
- `pickapic_sfw`: a rebuild of the PickScore prompt set (not the published split, which was shuffled
  without a seed; use `published` for that). The unique captions of the `train` split of
  `CarperAI/pickapic_v1_no_images_training_sfw` (Pick-a-Pic captions filtered for safe content, on
  the Hugging Face hub, read with the `datasets` library: `pip install datasets`) with at least 6
  words, shuffled with `--seed` (default 42); the first `--test_size` (1,024) are the test set, the rest the train set.
- `pickapic`: the unfiltered captions of Pick-a-Pic (`yuvalkirstain/pickapic_v1_no_images`, also read
  with `datasets`). Train prompts come from its `train` split, test prompts from `test_unique`.
- `geneval`: GenEval's prompt metadata (`prompts/evaluation_metadata.jsonl` of
  github.com/djghosh13/geneval; one JSON object per line with `prompt`, `tag`, `include`, ...),
  split into train and test. These are GenEval's *evaluation* prompts: a model trained on the train
  part is not evaluated on held-out GenEval prompts. For benchmark numbers, train on prompts made from
  GenEval's templates and object classes and keep the whole evaluation set for testing:
  `--source files --inputs my_geneval_train.jsonl --test_inputs evaluation_metadata.jsonl --name geneval`.
- `ocr`: text-rendering prompts from two public lists (`--url` for train, `--test_url` for test).
- `files`: local `.txt` / `.jsonl` files (`--inputs`, optionally `--test_inputs`), e.g. prompts
  written by hand or produced by another tool.

Every source goes through the same steps: whitespace is normalised, duplicates are dropped (case-
insensitive; the first occurrence and its metadata are kept), test prompts are removed from the
train set, and, when the source has no test split of its own (and is not `pickapic_sfw`), a
deterministic split puts a `--test_fraction` of the prompts into the test set. The split ranks prompts by a hash of
`(--seed, prompt)`, so it does not depend on the input order and is the same on every machine.
Prompts with metadata are written as `{split}_metadata.jsonl`, others as `{split}.txt`; a
`prepare_data.json` next to them records the source and the counts. Existing files are kept unless
`--overwrite` is given.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from absl import flags

from flow_grpo.command_flags import InputValueError, parse_flags
from flow_grpo.commands.errors import command_main, input_errors
from flow_grpo.data import Prompt, load_prompts

PICKAPIC_DATASET = "yuvalkirstain/pickapic_v1_no_images"
PICKAPIC_SFW_DATASET = "CarperAI/pickapic_v1_no_images_training_sfw"
SFW_MIN_WORDS = 6
"""`pickapic_sfw` keeps the captions with at least this many (whitespace-separated) words."""
GENEVAL_METADATA_URL = "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl"
OCR_TRAIN_URL = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/ocr/train.txt"
OCR_TEST_URL = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/ocr/test.txt"

DEFAULT_NAMES = {
    "pickapic_sfw": "pickscore_sfw",
    "pickapic": "pickapic",
    "geneval": "geneval",
    "ocr": "ocr",
    "files": "custom",
    "published": "",
}
"""Output directory name per source; the presets read `dataset/pickscore_sfw`, `dataset/geneval`, `dataset/ocr`.
`published` writes several folders under `--out` and takes no `--name`."""


# ------------------------------------------------------------------------ pure functions


def normalize_prompt(text: str) -> str:
    """Strip the prompt and collapse runs of whitespace (newlines and tabs included) to one space."""
    return re.sub(r"\s+", " ", text).strip()


def deduplicate(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Normalised prompts without blanks and duplicates (case-insensitive), first occurrence kept, order kept."""
    seen: set[str] = set()
    unique = []
    for prompt in prompts:
        text = normalize_prompt(prompt.text)
        key = text.casefold()
        if not text or key in seen:
            continue
        seen.add(key)
        unique.append(Prompt(text, dict(prompt.metadata)))
    return unique


def _rank_key(seed: int, prompt: Prompt) -> bytes:
    return hashlib.sha256(f"{seed}\0{prompt.text.casefold()}".encode()).digest()


def split_prompts(
    prompts: Sequence[Prompt],
    test_fraction: float,
    seed: int,
    test_prompts: Sequence[Prompt] | None = None,
) -> tuple[list[Prompt], list[Prompt]]:
    """Deduplicate and split into `(train, test)`.

    Args:
        prompts: candidate prompts (the train candidates when `test_prompts` is given).
        test_fraction: share of the prompts put into the test set when `test_prompts` is None;
            at least one prompt goes to each side. Ignored otherwise.
        seed: seed of the deterministic split.
        test_prompts: a test split given by the source; train prompts equal (case-insensitively) to
            a test prompt are dropped from train.

    Returns:
        Train and test prompts, each in the order of the (deduplicated) input.

    Raises:
        ValueError: on a fraction outside (0, 1), or too few prompts to fill both sides.
    """
    unique = deduplicate(prompts)
    if test_prompts is not None:
        test = deduplicate(test_prompts)
        held_out = {prompt.text.casefold() for prompt in test}
        train = [prompt for prompt in unique if prompt.text.casefold() not in held_out]
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"--test_fraction must be in (0, 1), got {test_fraction}; e.g. --test_fraction 0.1")
        if len(unique) < 2:
            raise ValueError(
                f"{len(unique)} unique prompt(s) cannot be split into a train and a test set; give at least two prompts"
            )
        num_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)
        ranked = sorted(range(len(unique)), key=lambda i: _rank_key(seed, unique[i]))
        test_indices = set(ranked[:num_test])
        train = [prompt for i, prompt in enumerate(unique) if i not in test_indices]
        test = [prompt for i, prompt in enumerate(unique) if i in test_indices]
    if not train or not test:
        raise ValueError(
            f"the split left {len(train)} train and {len(test)} test prompts; both need at least one "
            "(give train prompts that are not all in --test_inputs)"
        )
    return train, test


def cap(prompts: Sequence[Prompt], limit: int, seed: int) -> list[Prompt]:
    """At most `limit` prompts (0 = all), chosen by the same hash ranking as the split, in input order."""
    if limit <= 0 or len(prompts) <= limit:
        return list(prompts)
    keep = set(sorted(range(len(prompts)), key=lambda i: _rank_key(seed, prompts[i]))[:limit])
    return [prompt for i, prompt in enumerate(prompts) if i in keep]


def shuffle_split_captions(
    captions: Iterable[str], seed: int, num_test: int, min_words: int = SFW_MIN_WORDS
) -> tuple[list[Prompt], list[Prompt]]:
    """The `pickapic_sfw` prompt set: `(train, test)` from a list of captions.

    Captions are normalised and deduplicated (see `deduplicate`), those with fewer than
    `min_words` words are dropped, the rest are shuffled with `random.Random(seed)`; the first
    `num_test` form the test set, the others the train set (both in shuffled order).

    Raises:
        ValueError: when `num_test` < 1 or fewer than `num_test + 1` captions remain.
    """
    if num_test < 1:
        raise ValueError(f"the test set needs at least one prompt, got --test_size {num_test}")
    unique = deduplicate(Prompt(text, {}) for text in captions)
    kept = [prompt for prompt in unique if len(prompt.text.split()) >= min_words]
    if len(kept) <= num_test:
        raise ValueError(
            f"{len(kept)} unique captions with at least {min_words} words leave no train prompts after "
            f"{num_test} test prompts; lower --test_size"
        )
    random.Random(seed).shuffle(kept)
    return kept[num_test:], kept[:num_test]


def format_prompts(prompts: Sequence[Prompt]) -> tuple[str, str]:
    """`(file suffix, content)`: `.txt` with one prompt per line, or `_metadata.jsonl` when any prompt has metadata."""
    if any(prompt.metadata for prompt in prompts):
        lines = [json.dumps({"prompt": prompt.text, **prompt.metadata}, ensure_ascii=False) for prompt in prompts]
        return "_metadata.jsonl", "\n".join(lines) + "\n"
    return ".txt", "\n".join(prompt.text for prompt in prompts) + "\n"


def write_prompt_sets(
    out_dir: str | Path,
    train: Sequence[Prompt],
    test: Sequence[Prompt],
    provenance: dict[str, Any],
    overwrite: bool = False,
) -> list[Path]:
    """Write `train` / `test` prompt files (see `format_prompts`) and `prepare_data.json` into `out_dir`.

    Raises:
        FileExistsError: when a prompt file of either split already exists and `overwrite` is False.
    """
    out = Path(out_dir)
    existing = [out / f"{split}{suffix}" for split in ("train", "test") for suffix in (".txt", "_metadata.jsonl")]
    existing = [path for path in existing if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"prompt files already exist: {', '.join(map(str, existing))}; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for path in existing:  # a format change (txt <-> jsonl) must not leave the old file to shadow the new one
        path.unlink()
    written = []
    for split, prompts in (("train", train), ("test", test)):
        suffix, content = format_prompts(prompts)
        path = out / f"{split}{suffix}"
        path.write_text(content, encoding="utf-8")
        written.append(path)
    record = {**provenance, "num_train": len(train), "num_test": len(test), "files": [path.name for path in written]}
    (out / "prepare_data.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return written


# ----------------------------------------------------------------------------- sources


def parse_prompt_text(content: str, name: str) -> list[Prompt]:
    """Prompts of a downloaded `.txt` (one per line) or `.jsonl` (objects with "prompt") file named `name`."""
    if name.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{name}, line {number}: expected a JSON object with a string 'prompt'")
            text = record.pop("prompt")
            prompts.append(Prompt(text, record))
        return prompts
    return [Prompt(line, {}) for line in content.splitlines() if line.strip()]


def download_text(url: str, timeout: float = 60.0) -> str:
    """The body of `url` as UTF-8 text; a clear error when the machine is offline or the URL is gone."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except OSError as error:
        raise RuntimeError(
            f"could not download {url} ({error}); this source needs network access. Download the file "
            "elsewhere and use --source files --inputs <file>."
        ) from error


def hub_captions(dataset: str, split: str, column: str) -> list[str]:
    """The strings of `column` in split `split` of the hub dataset `dataset` (read with `datasets`)."""
    try:
        import datasets
    except ImportError:
        raise InputValueError(
            "the pickapic sources read a hub dataset with the `datasets` library, which is not installed; "
            "pip install datasets"
        ) from None
    rows = datasets.load_dataset(dataset, split=split)
    if column not in rows.column_names:
        raise InputValueError(
            f"dataset {dataset} split {split} has no column {column!r}; pass --hf_column, one of {rows.column_names}"
        )
    return [text for text in rows[column] if isinstance(text, str)]


def collect(args: flags.FlagValues) -> tuple[list[Prompt], list[Prompt] | None, dict[str, Any]]:
    """`(candidates, test split of the source or None, provenance)` for `args.source`."""
    if args.source == "pickapic_sfw":
        dataset = args.hf_dataset or PICKAPIC_SFW_DATASET
        captions = hub_captions(dataset, args.hf_train_split, args.hf_column)
        train, test = shuffle_split_captions(captions, args.seed, args.test_size)
        provenance = {"dataset": dataset, "splits": [args.hf_train_split], "min_words": SFW_MIN_WORDS, "test_size": args.test_size}
        return train, test, provenance
    if args.source == "pickapic":
        dataset = args.hf_dataset or PICKAPIC_DATASET
        train, test = (
            [Prompt(text, {}) for text in hub_captions(dataset, split, args.hf_column)]
            for split in (args.hf_train_split, args.hf_test_split)
        )
        return train, test, {"dataset": dataset, "splits": [args.hf_train_split, args.hf_test_split]}
    if args.source == "geneval":
        url = args.url or GENEVAL_METADATA_URL
        return parse_prompt_text(download_text(url), url), None, {"url": url}
    if args.source == "ocr":
        train_url, test_url = args.url or OCR_TRAIN_URL, args.test_url or OCR_TEST_URL
        train = parse_prompt_text(download_text(train_url), train_url)
        test = parse_prompt_text(download_text(test_url), test_url)
        return train, test, {"urls": [train_url, test_url]}
    inputs = [path for path in args.inputs.split(",") if path]
    if not inputs:
        raise InputValueError("--source files needs prompt files; pass --inputs a.txt[,b.jsonl,...]")
    train = [prompt for path in inputs for prompt in load_prompts(path)]
    test_inputs = [path for path in args.test_inputs.split(",") if path]
    test = [prompt for path in test_inputs for prompt in load_prompts(path)] if test_inputs else None
    return train, test, {"inputs": inputs, "test_inputs": test_inputs}


_FLAGS = flags.FlagValues()
flags.DEFINE_enum("source", None, sorted(DEFAULT_NAMES), "Where the prompts come from.", required=True, flag_values=_FLAGS)
flags.DEFINE_string("out", "dataset", "Parent directory of the prompt set.", flag_values=_FLAGS)
flags.DEFINE_string(
    "name", "", "Prompt set directory name; empty = pickscore_sfw / pickapic / geneval / ocr / custom.", flag_values=_FLAGS
)
flags.DEFINE_float("test_fraction", 0.1, "Test share when the source has no test split.", flag_values=_FLAGS)
flags.DEFINE_integer("test_size", 1024, "pickapic_sfw: number of test prompts.", flag_values=_FLAGS)
flags.DEFINE_integer("seed", 42, "Seed of the shuffle / deterministic split and caps.", flag_values=_FLAGS)
flags.DEFINE_integer("max_train", 0, "Keep at most this many train prompts (0 = all).", lower_bound=0, flag_values=_FLAGS)
flags.DEFINE_integer("max_test", 0, "Keep at most this many test prompts (0 = all).", lower_bound=0, flag_values=_FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace existing prompt files.", flag_values=_FLAGS)
flags.DEFINE_string("url", "", "geneval: metadata JSONL URL; ocr: train list URL.", flag_values=_FLAGS)
flags.DEFINE_string("test_url", "", "ocr: test list URL.", flag_values=_FLAGS)
flags.DEFINE_string(
    "hf_dataset", "", f"pickapic(_sfw): hub dataset id; empty = {PICKAPIC_SFW_DATASET} / {PICKAPIC_DATASET}.", flag_values=_FLAGS
)
flags.DEFINE_string("hf_train_split", "train", "pickapic(_sfw): split of the train prompts.", flag_values=_FLAGS)
flags.DEFINE_string("hf_test_split", "test_unique", "pickapic: split of the test prompts.", flag_values=_FLAGS)
flags.DEFINE_string("hf_column", "caption", "pickapic(_sfw): column holding the prompt.", flag_values=_FLAGS)
flags.DEFINE_string("inputs", "", "files: comma-separated .txt / .jsonl prompt files.", flag_values=_FLAGS)
flags.DEFINE_string("test_inputs", "", "files: comma-separated test prompt files (else split).", flag_values=_FLAGS)
flags.DEFINE_string(
    "from", "", "published: a clone of the authors' repository or a folder of its dataset files; empty = download.",
    flag_values=_FLAGS,
)


def prepare_published(args: flags.FlagValues) -> None:
    """`--source published`: verify every published file (downloaded or `--from`), then write them under `--out`."""
    from flow_grpo.paper.published import PUBLISHED_COMMIT, collect_published, write_published

    source_dir = args["from"].value or None
    if args.name:
        raise InputValueError("--source published writes pickscore_sfw/, geneval/, ocr/ and drawbench/; drop --name")
    with input_errors(RuntimeError, ValueError, OSError):  # a download, a changed or a missing file, --overwrite
        contents = collect_published(source_dir)
        written = write_published(args.out, contents, source_dir or "github", overwrite=args.overwrite)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} published prompt files of commit {PUBLISHED_COMMIT}, hashes verified, in {args.out}")


@command_main()
def main(argv: Sequence[str] | None = None) -> None:
    """Build the prompt set the flags describe (`argv`: the flags, default `sys.argv[1:]`)."""
    args = parse_flags(_FLAGS, argv, __doc__, "flow-grpo-prepare-data")
    if args.source == "published":
        prepare_published(args)
        return
    with input_errors(RuntimeError, ValueError):  # a download that failed, a bad line or split setting
        candidates, test_candidates, provenance = collect(args)
        train, test = split_prompts(candidates, args.test_fraction, args.seed, test_candidates)
    train, test = cap(train, args.max_train, args.seed), cap(test, args.max_test, args.seed)
    out_dir = Path(args.out) / (args.name or DEFAULT_NAMES[args.source])
    provenance = {"source": args.source, **provenance, "seed": args.seed}
    if test_candidates is None:
        provenance["test_fraction"] = args.test_fraction
    with input_errors(FileExistsError):
        written = write_prompt_sets(out_dir, train, test, provenance, overwrite=args.overwrite)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(train)} train and {len(test)} test prompts in {out_dir}")


if __name__ == "__main__":
    main()
