"""Score the tiny HPSv3 with the authors' `hpsv3` package; writes the parity reference JSON.

Run in an environment of its own with the package and its pinned transformers 4.45.2, from the folder
`flow_grpo.testing.preference_models.save_parity_inputs` wrote (see `regenerate.sh`):

    python tests/parity/reference_hpsv3.py INPUT_DIR tests/parity/hpsv3_reference.json

The package's own `HPSv3RewardInferencer` loads and scores; its config is the package's `HPSv3_7B.yaml`
with three settings changed: the base model is the tiny one, and it runs in float32 (not bfloat16), so
that the comparison measures the implementation, not rounding.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from PIL import Image


def tensor_digest(tensors: dict) -> float:
    """The fingerprint of flow_grpo.testing.preference_models.tensor_digest (the same formula)."""
    return float(sum(tensors[key].double().abs().sum() * (index + 1) for index, key in enumerate(sorted(tensors))))


def token_digest(ids: list[int]) -> str:
    """sha256 of the ids written as decimal numbers joined by commas."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def main(input_dir: Path, output: Path) -> None:
    import hpsv3
    from safetensors.torch import load_file

    options = json.loads((input_dir / "hpsv3" / "options.json").read_text())
    config = yaml.safe_load((Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml").read_text())
    config.update(model_name_or_path=options["base_model"], torch_dtype="float32", bf16=False)
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / "HPSv3_tiny.yaml"
        config_path.write_text(yaml.safe_dump(config))
        inferencer = hpsv3.HPSv3RewardInferencer(
            config_path=str(config_path), checkpoint_path=options["checkpoint"], device="cpu"
        )

    prompts = json.loads((input_dir / "prompts.json").read_text())
    images = [Image.open(input_dir / "images" / f"{index}.png").convert("RGB") for index in range(len(prompts))]
    with torch.no_grad():
        rewards = inferencer.reward(image_paths=images, prompts=prompts).float()
        batch = inferencer.prepare_batch(images, prompts)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    reference = {
        "package": ", ".join(f"{name} {version(name)}" for name in ("hpsv3", "transformers", "torch")),
        "checkpoint_digest": tensor_digest(load_file(options["checkpoint"])),
        "prompts": prompts,
        "input_ids_sha256": [token_digest(ids) for ids in rows],
        "input_lengths": [len(ids) for ids in rows],
        "image_grid_thw": batch["image_grid_thw"].tolist(),
        "pixel_values_sum": float(batch["pixel_values"].double().sum()),
        "mu_sigma": rewards.tolist(),
    }
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in reference.items()]
    output.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python reference_hpsv3.py INPUT_DIR OUTPUT_JSON")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
