"""Local reward models (PickScore, CLIPScore, aesthetic, HPSv2) on tiny models of the real classes.

Each tiny model is saved to disk and loaded back through the same path a real checkpoint takes
(``CLIPModel.from_pretrained`` / ``AutoProcessor.from_pretrained``, open_clip's
``create_model_and_transforms(arch, pretrained=<file>)``, ``torch.load(weights_only=True)``), with
the network blocked by ``conftest.py``. References are computed with the libraries' own processors.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from flow_grpo.rewards import ImagePreprocess, build_reward, jpeg_compressibility
from flow_grpo.rewards.clip_models import (
    AESTHETIC_DEFAULTS,
    CLIPSCORE_DEFAULTS,
    CLIPSCORE_HESSEL_DEFAULTS,
    PICKSCORE_DEFAULTS,
    AestheticHead,
    load_aesthetic_head,
)
from flow_grpo.rewards.hpsv2 import HPSV2_DEFAULTS
from flow_grpo.rewards.hpsv3 import HPSV3_DEFAULTS
from flow_grpo.rewards.imagereward import IMAGEREWARD_DEFAULTS
from flow_grpo.rewards.remote import NAMED_REMOTE_REWARDS, REMOTE_DEFAULTS
from flow_grpo.testing.rewards import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    save_tiny_aesthetic_head,
    save_tiny_clip,
    save_tiny_open_clip,
)

ROOT = Path(__file__).resolve().parents[1]
# One 8-bit grey level after normalisation (the largest std gives the smallest step): the on-device
# path resizes in float, the processors round the resized image to uint8.
ONE_LEVEL = 1.0 / 255 / min(OPENAI_CLIP_STD)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Directories and files of the tiny reward models, saved once for this module."""
    root = tmp_path_factory.mktemp("tiny-rewards")
    clip_dir = save_tiny_clip(root / "clip")
    arch, checkpoint = save_tiny_open_clip(root / "open_clip")
    head = save_tiny_aesthetic_head(root / "head")
    return {"clip": clip_dir, "arch": arch, "checkpoint": checkpoint, "head": head}


@pytest.fixture(scope="module")
def options(tiny_models: dict[str, str]) -> dict[str, dict]:
    """reward_options pointing every local reward at the tiny models."""
    clip = tiny_models["clip"]
    return {
        "pickscore": {"model": clip, "processor": clip},
        "clipscore": {"model": clip},
        "clipscore_hessel": {"model": clip},
        "aesthetic": {"model": clip, "head": tiny_models["head"]},
        "hpsv2": {"architecture": tiny_models["arch"], "checkpoint": tiny_models["checkpoint"]},
    }


@pytest.fixture(scope="module")
def rewards(options: dict[str, dict]) -> dict:
    """Each local reward built once (alone, weight 1) from the tiny models."""
    return {name: build_reward({name: 1.0}, "cpu", options) for name in options}


@pytest.fixture(scope="module")
def clip_reference(tiny_models: dict[str, str]):
    """``(CLIPModel, processor)`` loaded directly with transformers, for reference scores."""
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(tiny_models["clip"]).eval(), AutoProcessor.from_pretrained(tiny_models["clip"])


def _images(num: int, height: int = 48, width: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random 8-bit-valued images (N, 3, H, W) in [0, 1], like decoded samples, not pure noise."""
    noise = torch.rand(num, 3, height, width, generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    return (smooth * 255).round() / 255


def _pil(images: torch.Tensor) -> list[Image.Image]:
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


PROMPTS = ["a red dog", "a cat on a sofa", "a red dog", "an empty street at night"]


# ---- on-device preprocessing ----


@pytest.mark.parametrize("size", [(64, 64), (48, 71), (77, 50), (512, 512)])
def test_preprocess_matches_transformers_processors(tiny_models, size):
    from transformers import AutoProcessor, CLIPImageProcessorPil

    processor = AutoProcessor.from_pretrained(tiny_models["clip"])
    images = _images(3, *size)
    ours = ImagePreprocess.from_clip_image_processor(processor)(images)
    image_processor = processor.image_processor
    pil_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_processor.size.shortest_edge},
        crop_size={"height": image_processor.crop_size.height, "width": image_processor.crop_size.width},
        resample=image_processor.resample,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
    )
    # transformers' default CLIP processor resizes uint8 tensors with torchvision, as we do: equal.
    reference = image_processor(images=_pil(images), return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # Its PIL backend rounds PIL's fixed-point filter differently: at most one grey level.
    reference = pil_processor(images=_pil(images), return_tensors="pt")["pixel_values"]
    difference = (ours - reference).abs()
    assert difference.max() <= 1.05 * ONE_LEVEL
    assert difference.mean() <= 0.3 * ONE_LEVEL


@pytest.mark.parametrize("size", [(64, 64), (64, 70), (90, 40)])
def test_preprocess_matches_open_clip_transform(tiny_models, size):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(
        tiny_models["arch"], pretrained=tiny_models["checkpoint"]
    )
    preprocess = ImagePreprocess.from_open_clip(model.visual.preprocess_cfg)
    images = _images(2, *size)
    reference = torch.stack([transform(image) for image in _pil(images)])
    ours = preprocess(images)
    assert ours.shape == reference.shape
    difference = (ours - reference).abs()
    assert difference.max() <= 1.05 * ONE_LEVEL
    assert difference.mean() <= 0.3 * ONE_LEVEL
    if size == (64, 70):
        # 64x70 resizes to 32x35: torchvision's crop offset rounds 1.5 to 2, not down to 1.
        floor = ImagePreprocess(**{**preprocess.__dict__, "crop_offset": "floor"})
        assert (floor(images) - reference).abs().mean() > 2 * ONE_LEVEL


def test_preprocess_handles_dtypes_and_out_of_range_values():
    preprocess = ImagePreprocess(16, None, (16, 16), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bilinear")
    images = _images(2, 40, 30)
    out = preprocess(images.to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
    out_of_range = preprocess(images * 3 - 1)
    torch.testing.assert_close(out_of_range, preprocess((images * 3 - 1).clamp(0, 1)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        preprocess(images[:, :1])
    with pytest.raises(ValueError, match="interpolation"):
        ImagePreprocess(16, None, None, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "lanczos")


# ---- scorers against references computed with the libraries' processors ----


def _reference_clip(clip_reference, images: torch.Tensor, prompts: list[str]):
    """Image and text embeddings (normalised) and exp(logit_scale), via CLIPProcessor + CLIPModel."""
    model, processor = clip_reference
    inputs = processor(text=prompts, images=_pil(images), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    image = torch.nn.functional.normalize(outputs.image_embeds, dim=-1)
    text = torch.nn.functional.normalize(outputs.text_embeds, dim=-1)
    return image, text, model.logit_scale.exp().item(), outputs.logits_per_image


# Scorer-vs-reference comparisons. The transformers processor preprocesses exactly as we do, so the
# CLIP scorers agree to float precision at any size. open_clip's PIL transform can differ by one
# grey level after a resize (exact at the model's own 32x32 size), which moves a tiny random
# model's score by well under 1%.
CLIP_SIZES = [(32, 32), (48, 60)]
OPEN_CLIP_SIZES_AND_TOLERANCES = [((32, 32), 1e-5), ((48, 60), 1e-2)]


@pytest.mark.parametrize("size", CLIP_SIZES)
def test_pickscore_matches_clip_forward(rewards, clip_reference, size):
    images = _images(4, *size)
    scores = rewards["pickscore"](images, PROMPTS, [{}] * 4)["pickscore"]
    _, _, _, logits = _reference_clip(clip_reference, images, PROMPTS)
    expected = logits.diagonal() / 26
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # Scores differ between images: the model is really used, not a constant.
    assert scores.std() > 1e-3


@pytest.mark.parametrize("size", CLIP_SIZES)
def test_clipscore_is_the_public_logit_over_30(rewards, clip_reference, size):
    """clipscore = logits_per_image / 30 as the public ClipScorer (text padded to max_length); negatives kept."""
    images = _images(4, *size, seed=1)
    scores = rewards["clipscore"](images, PROMPTS, [{}] * 4)["clipscore"]
    model, processor = clip_reference
    inputs = processor(text=PROMPTS, images=_pil(images), padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    torch.testing.assert_close(scores, logits.diagonal() / 30, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-4


@pytest.mark.parametrize("size", CLIP_SIZES)
def test_clipscore_hessel_is_clamped_scaled_cosine(rewards, clip_reference, options, size):
    images = _images(4, *size, seed=1)
    scores = rewards["clipscore_hessel"](images, PROMPTS, [{}] * 4)["clipscore_hessel"]
    image, text, _, _ = _reference_clip(clip_reference, images, PROMPTS)
    cosine = (image * text).sum(-1)
    torch.testing.assert_close(scores, 2.5 * cosine.clamp(min=0), atol=1e-5, rtol=1e-5)
    scaled = build_reward(
        {"clipscore_hessel": 1.0}, "cpu", {"clipscore_hessel": {**options["clipscore_hessel"], "scale": 1.0}}
    )
    torch.testing.assert_close(scaled(images, PROMPTS, [{}] * 4)["clipscore_hessel"], scores / 2.5)


@pytest.mark.parametrize("size", CLIP_SIZES)
def test_aesthetic_applies_the_head_to_normalised_image_embeddings(rewards, clip_reference, tiny_models, size):
    images = _images(4, *size, seed=2)
    scores = rewards["aesthetic"](images, PROMPTS, [{}] * 4)["aesthetic"]
    image, _, _, _ = _reference_clip(clip_reference, images, PROMPTS)
    head = AestheticHead(32)
    head.load_state_dict(torch.load(tiny_models["head"], weights_only=True))
    with torch.no_grad():
        expected = head.eval()(image)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # Prompts do not matter for the aesthetic score.
    other = rewards["aesthetic"](images, ["x"] * 4, [{}] * 4)["aesthetic"]
    torch.testing.assert_close(other, scores)


def test_aesthetic_head_layout_matches_the_laion_state_dict():
    keys = set(AestheticHead().state_dict())
    expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert keys == expected
    assert AestheticHead().layers[0].in_features == 768


@pytest.mark.parametrize("size, tolerance", OPEN_CLIP_SIZES_AND_TOLERANCES)
def test_hpsv2_matches_open_clip_reference(rewards, tiny_models, size, tolerance):
    import open_clip

    images = _images(4, *size, seed=3)
    scores = rewards["hpsv2"](images, PROMPTS, [{}] * 4)["hpsv2"]
    model, _, transform = open_clip.create_model_and_transforms(
        tiny_models["arch"], pretrained=tiny_models["checkpoint"]
    )
    tokenizer = open_clip.get_tokenizer(tiny_models["arch"])
    with torch.no_grad():
        image = model.eval().encode_image(torch.stack([transform(p) for p in _pil(images)]), normalize=True)
        text = model.encode_text(tokenizer(PROMPTS), normalize=True)
    expected = (image * text).sum(-1)
    torch.testing.assert_close(scores, expected, atol=tolerance * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2"])
def test_chunking_deduplication_and_order_do_not_change_scores(rewards, options, name):
    images = _images(5, seed=4)
    prompts = ["a", "b", "a", "c", "a"]
    whole = rewards[name](images, prompts, [{}] * 5)[name]
    chunked_options = {name: {**options[name], "batch_size": 2}}
    chunked = build_reward({name: 1.0}, "cpu", chunked_options)(images, prompts, [{}] * 5)[name]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    order = torch.tensor([4, 2, 0, 3, 1])
    permuted = rewards[name](images[order], [prompts[i] for i in order], [{}] * 5)[name]
    torch.testing.assert_close(permuted, whole[order], atol=1e-5, rtol=0)


def test_dtype_option_runs_the_model_in_that_dtype(rewards, options):
    images = _images(3, seed=5)
    full = rewards["pickscore"](images, PROMPTS[:3], [{}] * 3)["pickscore"]
    half = build_reward({"pickscore": 1.0}, "cpu", {"pickscore": {**options["pickscore"], "dtype": "bfloat16"}})
    scores = half(images, PROMPTS[:3], [{}] * 3)["pickscore"]
    assert scores.dtype == torch.float32
    assert not torch.equal(scores, full)  # really computed in bfloat16
    torch.testing.assert_close(scores, full, atol=5e-2, rtol=0)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2"])
def test_scorer_runs_without_grad_and_takes_images_of_any_float_dtype(rewards, name):
    images = _images(2, seed=6)
    scores = rewards[name](images.double().requires_grad_(True), PROMPTS[:2], [{}] * 2)[name]
    assert not scores.requires_grad
    torch.testing.assert_close(scores, rewards[name](images, PROMPTS[:2], [{}] * 2)[name])


# ---- weighted combination ----


def test_weighted_multi_reward_sums_and_keeps_each_score(rewards, options):
    images = _images(4, seed=7)
    metadata = [{}] * 4
    weights = {"pickscore": 2.0, "hpsv2": -0.5, "aesthetic": 0.25, "jpeg_compressibility": 0.1}
    scores = build_reward(weights, "cpu", options)(images, PROMPTS, metadata)
    assert set(scores) == {*weights, "avg"}
    for name in ("pickscore", "hpsv2", "aesthetic"):
        alone = rewards[name](images, PROMPTS, metadata)[name]
        torch.testing.assert_close(scores[name], alone)
    torch.testing.assert_close(scores["jpeg_compressibility"], jpeg_compressibility(images, PROMPTS, metadata))
    expected = sum(weight * scores[name] for name, weight in weights.items())
    torch.testing.assert_close(scores["avg"], expected)


# ---- options and errors ----


def _base_config():
    spec = importlib.util.spec_from_file_location("flow_grpo_config_base_for_rewards", ROOT / "config" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_config_defaults_mirror_the_reward_defaults():
    reward_options = _base_config().reward_options
    expected = {
        "pickscore": PICKSCORE_DEFAULTS,
        "clipscore": CLIPSCORE_DEFAULTS,
        "clipscore_hessel": CLIPSCORE_HESSEL_DEFAULTS,
        "aesthetic": AESTHETIC_DEFAULTS,
        "hpsv2": HPSV2_DEFAULTS,
        "imagereward": IMAGEREWARD_DEFAULTS,
        "hpsv3": HPSV3_DEFAULTS,
        **{name: REMOTE_DEFAULTS for name in ("remote", *NAMED_REMOTE_REWARDS)},
    }
    assert set(reward_options.keys()) == set(expected)
    for name, defaults in expected.items():
        assert reward_options[name].to_dict() == defaults, name


def test_full_config_options_are_accepted_by_build_reward():
    config = _base_config()
    reward = build_reward({"jpeg_compressibility": 1.0}, "cpu", config.reward_options)
    assert reward.names == ["jpeg_compressibility"]


def test_option_errors_name_the_setting(options, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown option.*'modle'.*reward_options\.pickscore"):
        build_reward({"pickscore": 1.0}, "cpu", {"pickscore": {"modle": "x"}})
    with pytest.raises(ValueError, match=r"reward_options\.pickscore\.batch_size is '8'; give a value of type int"):
        build_reward({"pickscore": 1.0}, "cpu", {"pickscore": {**options["pickscore"], "batch_size": "8"}})
    with pytest.raises(ValueError, match=r"reward_options\.hpsv2\.dtype"):
        build_reward({"hpsv2": 1.0}, "cpu", {"hpsv2": {**options["hpsv2"], "dtype": "half"}})
    with pytest.raises(OSError, match=r"reward_options\.clipscore\.model"):
        build_reward({"clipscore": 1.0}, "cpu", {"clipscore": {"model": str(tmp_path / "missing")}})
    with pytest.raises(FileNotFoundError, match=r"reward_options\.aesthetic\.head.*improved-aesthetic-predictor"):
        build_reward(
            {"aesthetic": 1.0}, "cpu", {"aesthetic": {**options["aesthetic"], "head": str(tmp_path / "x.pth")}}
        )
    with pytest.raises(FileNotFoundError, match=r"Could not fetch .*reward_options\.hpsv2\.checkpoint"):
        build_reward({"hpsv2": 1.0}, "cpu", {"hpsv2": {**options["hpsv2"], "checkpoint": "nobody/nothing:hps.pt"}})
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        build_reward({"hpsv2": 1.0}, "cpu", {"hpsv2": {**options["hpsv2"], "architecture": "ViT-Q-99"}})


def test_aesthetic_head_of_the_wrong_size_is_rejected(tmp_path):
    file = save_tiny_aesthetic_head(tmp_path, input_dim=16)
    with pytest.raises(ValueError, match="32-dimensional"):
        load_aesthetic_head(file, 32)


def test_importing_rewards_does_not_import_model_stacks():
    code = (
        "import sys, flow_grpo.rewards as r; "
        "names = {'pickscore', 'hpsv2', 'aesthetic', 'clipscore', 'clipscore_hessel', 'geneval', 'geneval_strict', "
        "'geneval_correct', 'ocr', 'ocr_exact', 'remote', 'unifiedreward'}; "
        "assert names <= set(r.available_rewards()); "
        "heavy = [m for m in ('transformers', 'open_clip', 'diffusers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ---- throughput ----


def test_throughput_90_images_512px_is_one_batched_pass(tmp_path):
    """90 images at 512x512 through a tiny CLIP with a 224-pixel processor: one pass, chunked.

    Prints the time; the assertion is on the number of model calls (ceil(90 / batch_size) image
    calls and one text call for 2 distinct prompts), not on the machine-dependent time.
    """
    clip_dir = save_tiny_clip(tmp_path / "clip224", image_size=224, patch_size=32)
    reward = build_reward({"pickscore": 1.0}, "cpu", {"pickscore": {"model": clip_dir, "processor": clip_dir}})
    encoder = reward._rewards["pickscore"].encoder
    calls = {"vision": 0, "text": 0}
    encoder.model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    encoder.model.text_model.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))

    images = torch.rand(90, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "a photo of a dog"] * 45
    reward(images[:4], prompts[:4], [{}] * 4)  # warm-up
    calls.update(vision=0, text=0)
    start = time.perf_counter()
    scores = reward(images, prompts, [{}] * 90)["pickscore"]
    elapsed = time.perf_counter() - start
    assert scores.shape == (90,) and torch.isfinite(scores).all()
    assert calls == {"vision": 2, "text": 1}  # batch_size 64 -> 2 image chunks
    print(
        f"\npickscore (tiny CLIP, 224 px processor) on 90 images at 512x512, CPU: "
        f"{elapsed:.3f} s, {90 / elapsed:.0f} images/s"
    )
