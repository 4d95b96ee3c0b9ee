"""The in-project ImageReward and HPSv3 scorers against their authors' packages, on tiny seeded weights.

The references in tests/parity/*.json were written by the packages themselves (image-reward 1.5 and
hpsv3 1.0.0, each with transformers 4.45.2) on the checkpoints of flow_grpo.testing.preference_models;
`bash tests/parity/regenerate.sh` rebuilds them. A digest check tells a changed builder apart from a
changed scorer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from flow_grpo.rewards import build_reward
from flow_grpo.rewards.hpsv3 import HPSV3_INSTRUCTION, REWARD_TOKEN, make_hpsv3
from flow_grpo.rewards.imagereward import imagereward_tokenizer, make_imagereward
from flow_grpo.testing.preference_models import parity_inputs, save_tiny_hpsv3, save_tiny_imagereward, tensor_digest

PARITY = Path(__file__).parent / "parity"
REGENERATE = "the tiny checkpoint changed: rerun `bash tests/parity/regenerate.sh`"


def _reference(name: str) -> dict:
    return json.loads((PARITY / f"{name}_reference.json").read_text())


@pytest.fixture(scope="module")
def imagereward_options(tmp_path_factory) -> dict:
    return save_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


@pytest.fixture(scope="module")
def hpsv3_options(tmp_path_factory) -> dict:
    return save_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture(scope="module")
def hpsv3_scorer(hpsv3_options):
    return make_hpsv3(torch.device("cpu"), hpsv3_options)


def test_imagereward_matches_the_package(imagereward_options) -> None:
    reference = _reference("imagereward")
    state = torch.load(imagereward_options["checkpoint"], weights_only=True)
    assert tensor_digest(state) == pytest.approx(reference["checkpoint_digest"], rel=1e-12), REGENERATE
    images, prompts = parity_inputs()
    assert prompts == reference["prompts"]
    tokenizer = imagereward_tokenizer(imagereward_options["tokenizer"])
    ids = tokenizer(prompts, truncation=True, max_length=35)["input_ids"]
    assert [" ".join(map(str, row)) for row in ids] == reference["input_ids"]
    reward = build_reward({"imagereward": 1.0}, "cpu", {"imagereward": {**imagereward_options, "batch_size": 2}})
    scores = reward(images, prompts, [{}] * len(prompts))["imagereward"]
    torch.testing.assert_close(scores, torch.tensor(reference["scores"]), atol=2e-6, rtol=0)
    # float images take the same 8-bit path as the package's PIL input
    floats = reward(images.float() / 255, prompts, [{}] * len(prompts))["imagereward"]
    torch.testing.assert_close(floats, scores, atol=1e-6, rtol=0)


def test_hpsv3_inputs_match_the_package(hpsv3_options, hpsv3_scorer) -> None:
    """Token ids pin the chat template, instruction text, <|Reward|> and image-token count; pixels the resize."""
    reference = _reference("hpsv3")
    assert tensor_digest(_safetensors(hpsv3_options["checkpoint"])) == pytest.approx(
        reference["checkpoint_digest"], rel=1e-12
    ), REGENERATE
    images, prompts = parity_inputs()
    batch = hpsv3_scorer.inputs(_pil(images), prompts)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert [len(row) for row in rows] == reference["input_lengths"]
    assert [hashlib.sha256(",".join(map(str, row)).encode()).hexdigest() for row in rows] == reference["input_ids_sha256"]
    assert batch["image_grid_thw"].tolist() == reference["image_grid_thw"]
    assert float(batch["pixel_values"].double().sum()) == pytest.approx(reference["pixel_values_sum"], rel=1e-6)
    assert batch["attention_mask"][:, 0].all()  # right padding: HPSv3's positions count from the first token


def test_hpsv3_scores_match_the_package(hpsv3_scorer) -> None:
    reference = torch.tensor(_reference("hpsv3")["mu_sigma"])
    images, prompts = parity_inputs()
    batch = hpsv3_scorer.inputs(_pil(images), prompts)
    with torch.no_grad():
        mu_sigma = hpsv3_scorer.model(**{key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")})
    torch.testing.assert_close(mu_sigma, reference, atol=2e-6, rtol=0)
    # the reward is mu, scored in chunks of batch_size (here 2 + 1: padding differs from the reference batch)
    hpsv3_scorer.batch_size = 2
    torch.testing.assert_close(hpsv3_scorer(images, prompts, [{}] * 3), reference[:, 0], atol=2e-6, rtol=0)


def test_bfloat16_runs_the_models_in_bfloat16_and_the_heads_in_float32(imagereward_options, hpsv3_options) -> None:
    """The GPU setting of HPSv3 (and an option of ImageReward): close to the float32 references, heads in float32."""
    hpsv3 = make_hpsv3(torch.device("cpu"), {**hpsv3_options, "dtype": "bfloat16"})
    imagereward = make_imagereward(torch.device("cpu"), {**imagereward_options, "dtype": "bfloat16"})
    assert hpsv3.model.backbone.dtype == torch.bfloat16 and hpsv3.model.head[0].weight.dtype == torch.float32
    assert imagereward.model.vision.dtype == torch.bfloat16
    assert imagereward.model.head.layers[0].weight.dtype == torch.float32
    images, prompts = parity_inputs()
    scores = {"hpsv3": hpsv3(images, prompts, [{}] * 3), "imagereward": imagereward(images, prompts, [{}] * 3)}
    hpsv3_reference = torch.tensor(_reference("hpsv3")["mu_sigma"])[:, 0]
    torch.testing.assert_close(scores["hpsv3"], hpsv3_reference, atol=0.05, rtol=0)
    torch.testing.assert_close(scores["imagereward"], torch.tensor(_reference("imagereward")["scores"]), atol=0.05, rtol=0)


def test_hpsv3_refuses_a_prompt_holding_the_reward_token(hpsv3_scorer) -> None:
    images, _ = parity_inputs(count=1)
    with pytest.raises(ValueError, match="exactly one <\\|Reward\\|>"):
        hpsv3_scorer(images, [f"a cat {REWARD_TOKEN}"], [{}])
    assert "{text_prompt}" in HPSV3_INSTRUCTION and REWARD_TOKEN not in HPSV3_INSTRUCTION


def test_hpsv3_refuses_a_tokenizer_that_misplaces_the_reward_token(hpsv3_options, tmp_path) -> None:
    base = Path(hpsv3_options["base_model"])
    copy = tmp_path / "base"
    copy.mkdir()
    for file in base.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    # one more added token before <|Reward|>, as a tokenizer of another base model would have
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    extra = {**tokenizer["added_tokens"][-1], "id": tokenizer["added_tokens"][-1]["id"] + 1, "content": "<|extra|>"}
    tokenizer["added_tokens"].append(extra)
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="gives <\\|Reward\\|> the id"):
        make_hpsv3(torch.device("cpu"), {**hpsv3_options, "base_model": str(copy)})


def test_imagereward_refuses_another_checkpoint(imagereward_options, tmp_path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="is not an ImageReward checkpoint"):
        build_reward({"imagereward": 1.0}, "cpu", {"imagereward": {**imagereward_options, "checkpoint": str(wrong)}})
    state = torch.load(imagereward_options["checkpoint"], weights_only=True)
    del state["mlp.layers.7.weight"]
    torch.save(state, wrong)
    with pytest.raises(ValueError, match="lacks ImageReward weights.*head.layers.7.weight"):
        build_reward({"imagereward": 1.0}, "cpu", {"imagereward": {**imagereward_options, "checkpoint": str(wrong)}})


def _safetensors(file: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(file)


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
