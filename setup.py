"""Installs the `flow_grpo` package only; configs, scripts and entry points stay in the repository."""

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
    python_requires=">=3.10",
    packages=find_packages(include=["flow_grpo", "flow_grpo.*"]),
    install_requires=_requirements(),
    extras_require={
        "rewards": ["open_clip_torch>=2.29", "ftfy>=6.1"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
    },
)
