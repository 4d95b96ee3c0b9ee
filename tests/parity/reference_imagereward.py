"""Score the tiny ImageReward with the authors' `image-reward` package; writes the parity reference JSON.

Run in an environment of its own where the package imports (it does not with transformers 5), from the
folder `flow_grpo.testing.preference_models.save_parity_inputs` wrote (see `regenerate.sh`):

    python tests/parity/reference_imagereward.py INPUT_DIR tests/parity/imagereward_reference.json

The package hard-codes the real sizes (ViT-L/16, `MLP(768)`) and fetches `bert-base-uncased`, so three
of its construction points are pointed at the tiny model: `create_vit` builds the package's own
`VisionTransformer` at the tiny sizes, `MLP` gets the tiny text width, and `BertTokenizer.from_pretrained`
reads the tiny vocabulary. Loading (`ImageReward.load`) and scoring (`model.score`) are the package's.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from PIL import Image


def tensor_digest(tensors: dict) -> float:
    """The fingerprint of flow_grpo.testing.preference_models.tensor_digest (the same formula)."""
    return float(sum(tensors[key].double().abs().sum() * (index + 1) for index, key in enumerate(sorted(tensors))))


def main(input_dir: Path, output: Path) -> None:
    import ImageReward
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    options = json.loads((input_dir / "imagereward" / "options.json").read_text())
    med_config = json.loads(Path(options["med_config"]).read_text())
    width = med_config["encoder_width"]

    def tiny_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        model = VisionTransformer(img_size=image_size, patch_size=32, embed_dim=width, depth=2, num_heads=width // 64)
        return model, width

    class TinyBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            return BertTokenizer.from_pretrained(options["tokenizer"])

    package_module = sys.modules["ImageReward.ImageReward"]
    mlp = package_module.MLP
    blip_pretrain.create_vit = tiny_vit
    blip.BertTokenizer = TinyBertTokenizer
    package_module.MLP = lambda input_size: mlp(med_config["hidden_size"])

    model = ImageReward.load(options["checkpoint"], device="cpu", med_config=options["med_config"])
    state = torch.load(options["checkpoint"], map_location="cpu", weights_only=True)
    # The package loads with strict=False: make sure every weight it scores with came from the file.
    unused_by_score = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
    missing = [key for key in model.state_dict() if key not in state and not key.startswith(unused_by_score)]
    unexpected = [key for key in state if key not in model.state_dict()]
    if missing or unexpected:
        raise SystemExit(f"tiny checkpoint does not fit the package's model: missing {missing}, unexpected {unexpected}")

    prompts = json.loads((input_dir / "prompts.json").read_text())
    images = [Image.open(input_dir / "images" / f"{index}.png").convert("RGB") for index in range(len(prompts))]
    with torch.no_grad():
        scores = [float(model.score(prompt, image)) for prompt, image in zip(prompts, images)]
        tokens = model.blip.tokenizer(prompts, truncation=True, max_length=35)["input_ids"]
    reference = {
        "package": ", ".join(f"{name} {version(name)}" for name in ("image-reward", "transformers", "torch")),
        "checkpoint_digest": tensor_digest(state),
        "prompts": prompts,
        "input_ids": [" ".join(map(str, ids)) for ids in tokens],  # before the padding to 35
        "scores": scores,
    }
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in reference.items()]
    output.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python reference_imagereward.py INPUT_DIR OUTPUT_JSON")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
