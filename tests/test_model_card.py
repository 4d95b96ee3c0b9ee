"""Exported LoRA model cards: a plain diffusers call built only from the card reproduces the trainer's eval images."""

from __future__ import annotations

import os

import diffusers
import pytest
import torch

from flow_grpo.run.model_card import read_card_settings
from flow_grpo.models import adapter_class
from flow_grpo.testing import save_tiny_pipeline
from flow_grpo.training.trainer import Trainer
from tests.test_trainer import tiny_config


@pytest.fixture(scope="module")
def card_models(tiny_sd3_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A saved tiny pipeline per family."""
    models = {"sd3": tiny_sd3_dir}
    for family in ("flux", "flux2_klein", "z_image", "qwen_image"):
        models[family] = save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{family}-card"), family, "minimal")
    return models


def _trainer_eval_images(trainer: Trainer) -> torch.Tensor:
    """The trainer's evaluation images of its first eval batch (as `Trainer.evaluate` samples them)."""
    result = trainer.score_test_prompts(keep_images=trainer.config.sample.eval_batch_size)
    return torch.stack([image for image, _, _ in result.images])


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2_klein", "z_image", "qwen_image"])
def test_card_settings_reproduce_the_trainer_eval_images(family, card_models, tmp_path) -> None:
    preset = "tiny_flux" if family == "flux" else "tiny_tp_grpo"  # CFG 4.5 for the CFG families
    config = tiny_config(card_models[family], tmp_path, preset, eval_freq=1,
                         **{"sample.eval_batch_size": 2, "sample.eval_num_steps": 4, "pretrained.family": family})
    trainer = Trainer(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA that changes the output (a fresh one has B = 0)
        for param in trainer.trainable:
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    trainer.evaluate(0)
    expected = _trainer_eval_images(trainer)
    lora_dir = os.path.join(trainer.save_checkpoint(0), "lora")

    card = open(os.path.join(lora_dir, "README.md")).read()
    for text in ("Base model", "Algorithm", "Training reward", "Epoch", "Eval score", "max_sequence_length", "load_lora_weights"):
        assert text in card
    settings = read_card_settings(lora_dir)
    assert settings["call"]["max_sequence_length"] == config.pretrained.max_sequence_length
    assert settings["eval"] is not None and settings["epoch"] == 0

    pipeline_class = getattr(diffusers, settings["pipeline"])
    assert pipeline_class is adapter_class(family).pipeline_class
    pipe = pipeline_class.from_pretrained(settings["base_model"], torch_dtype=getattr(torch, settings["torch_dtype"]))
    noise = settings["noise"]
    pipe.to(noise["generator_device"])
    plain = pipe(prompt=list(noise["first_eval_batch_prompts"]), **settings["call"], output_type="pt",
                 generator=torch.Generator(noise["generator_device"]).manual_seed(noise["first_eval_batch_seed"])).images
    pipe.load_lora_weights(lora_dir)
    images = pipe(prompt=list(noise["first_eval_batch_prompts"]), **settings["call"], output_type="pt",
                  generator=torch.Generator(noise["generator_device"]).manual_seed(noise["first_eval_batch_seed"])).images
    assert images.shape == expected.shape
    torch.testing.assert_close(images.float(), expected, atol=2e-3, rtol=0)
    assert (plain.float() - expected).abs().max() > 1e-2  # the LoRA matters: the base model's images differ


def _snippet(card: str) -> str:
    return card.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_a_quote_in_the_model_path_stays_a_string_and_nan_scores_stay_strict_json(tmp_path) -> None:
    import ast
    import json

    from flow_grpo.run.model_card import card_settings, write_model_card
    from tests.test_trainer import tiny_config as make_config

    hostile = 'models/x", torch_dtype=None); import os; os.system("echo pwned'
    config = make_config(hostile, tmp_path)
    settings = card_settings(config, "StableDiffusion3Pipeline", 0, {"jpeg_compressibility": float("nan")}, ['say "hi"'], "cpu")
    path = write_model_card(tmp_path, settings)
    card = open(path, encoding="utf-8").read()
    tree = ast.parse(_snippet(card))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained"]
    assert [call.args[0].value for call in calls] == [hostile]  # the whole path is one string literal
    assert not any(isinstance(node, ast.Import) and node.names[0].name == "os" for node in ast.walk(tree))
    block = card.split("```json\n", 1)[1].split("\n```", 1)[0]
    parsed = json.loads(block, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert parsed["eval"] == {"jpeg_compressibility": None}
    assert "not finite" in card
