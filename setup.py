"""Installs the `flow_grpo` package and its console commands; presets, datasets and launch scripts stay in
the repository (an editable install, `pip install -e .`, keeps the commands pointing at the checkout)."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="flow_grpo",
    version="0.1.0",
    description="Flow-GRPO and TP-GRPO reinforcement learning for flow-matching text-to-image models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # tested on 3.11
    classifiers=["Programming Language :: Python :: 3", "Programming Language :: Python :: 3.11"],
    packages=find_packages(include=["flow_grpo", "flow_grpo.*"]),
    install_requires=_requirements(),
    extras_require={
        "rewards": ["open_clip_torch>=2.29", "ftfy>=6.1"],
        "tensorboard": ["tensorboard>=2.14"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "tensorboard>=2.14"],
    },
    entry_points={
        "console_scripts": [
            "flow-grpo-train=flow_grpo.train:main",
            "flow-grpo-evaluate=flow_grpo.commands.evaluate:main",
            "flow-grpo-generate=flow_grpo.commands.generate:main",
            "flow-grpo-benchmark=flow_grpo.commands.benchmark:main",
            "flow-grpo-memory=flow_grpo.commands.memory:main",
            "flow-grpo-tp-agreement=flow_grpo.commands.tp_agreement:main",
            "flow-grpo-reward-server=flow_grpo.commands.reward_server:main",
            "flow-grpo-reward-server-benchmark=flow_grpo.commands.benchmark:reward_server_main",
            "flow-grpo-prepare-data=flow_grpo.commands.prepare_data:main",
            "flow-grpo-paper-eval=flow_grpo.commands.paper_eval:main",
        ],
    },
)
