"""The TP diagnostic plot and the eval grid, checked on the matplotlib figures themselves."""

import pytest
import torch
from PIL import Image

from flow_grpo.run import pictures
from flow_grpo.algorithm.turning_points import step_rewards


def _markers(axis, gid: str) -> list[tuple[float, float]]:
    """(x, y) of every turning-point marker of one kind drawn on the axis."""
    return [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in axis.get_lines() if line.get_gid() == gid]


def test_reward_curves_figure_has_axes_legend_title_and_marks_kept_and_dropped():
    # Trajectory 0: TP at j = 0 (kept) and j = 2 (dropped); trajectory 1: no turning point.
    completed = torch.tensor([[0.0, 1.0, 0.5, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    candidates = torch.tensor([[True, False, True, False], [False, False, False, False]])
    kept = torch.tensor([[True, False, False, False], [False, False, False, False]])
    figure = pictures.reward_curves_figure(completed, candidates, kept=kept, epoch=17)
    (axis,) = figure.axes
    assert "window step" in axis.get_xlabel()
    assert "reward" in axis.get_ylabel()
    assert "epoch 17" in axis.get_title()
    assert [tick for tick in axis.get_xticks()] == [0, 1, 2, 3, 4]
    entries = [text.get_text() for text in axis.get_legend().get_texts()]
    assert entries[0].startswith("trajectory 0") and entries[1].startswith("trajectory 1")
    assert pictures.KEPT_LABEL in entries and pictures.DROPPED_LABEL in entries
    # Markers sit on the middle of the turning step's segment R_j -> R_{j+1}.
    assert _markers(axis, "kept") == [(0.5, 0.5)]
    assert _markers(axis, "dropped") == [(2.5, 1.25)]
    curve = axis.get_lines()[0]
    assert list(curve.get_ydata()) == [0.0, 1.0, 0.5, 2.0, 3.0]


def test_reward_curves_without_kept_mask_marks_every_turning_point_kept():
    completed = torch.tensor([[0.0, 1.0, 0.5, 2.0, 3.0]])
    candidates = torch.tensor([[True, False, True, False]])
    figure = pictures.reward_curves_figure(completed, candidates)
    (axis,) = figure.axes
    assert len(_markers(axis, "kept")) == 2 and _markers(axis, "dropped") == []
    assert "epoch" not in axis.get_title()


def test_reward_curves_plot_renders_real_step_rewards_to_an_image():
    torch.manual_seed(0)
    completed = torch.cat([torch.zeros(8, 1), torch.randn(8, 6).cumsum(1)], dim=1)
    result = step_rewards(completed)
    image = pictures.reward_curves_plot(completed, result.candidates, kept=result.turning_points, epoch=3)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.size[0] > 400 and image.size[1] > 200


def test_reward_curves_rejects_inconsistent_masks():
    completed = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="turning_points must have shape"):
        pictures.reward_curves_figure(completed, torch.zeros(2, 5, dtype=torch.bool))
    candidates = torch.zeros(2, 4, dtype=torch.bool)
    kept = candidates.clone()
    kept[0, 1] = True
    with pytest.raises(ValueError, match="not in turning_points"):
        pictures.reward_curves_figure(completed, candidates, kept=kept)


def test_trajectories_to_show_prefers_dropped_then_kept_turning_points():
    candidates = torch.tensor([[False, False], [True, False], [True, True], [False, False], [False, True]])
    kept = torch.tensor([[False, False], [True, False], [True, False], [False, False], [False, False]])
    # Row 2 and 4 have a dropped turning point, row 1 only kept ones, rows 0 and 3 none.
    assert pictures.trajectories_to_show(candidates, kept, count=3).tolist() == [1, 2, 4]
    assert pictures.trajectories_to_show(candidates, kept, count=2).tolist() == [2, 4]
    assert pictures.trajectories_to_show(candidates, kept, count=10).tolist() == [0, 1, 2, 3, 4]


def test_image_grid_titles_each_tile_with_shortened_prompt_and_score():
    images = torch.rand(5, 3, 16, 16)
    prompts = ["a cat", "a very long prompt " * 10, "c", "d", "e"]
    figure = pictures.image_grid_figure(images, columns=4, prompts=prompts, scores=[0.5, 0.25, 1.0, 2.0, 3.125])
    titled = [axis.get_title() for axis in figure.axes if axis.get_images()]
    assert len(titled) == 5 and len(figure.axes) == 8  # two rows of four, three empty tiles
    assert titled[0] == "a cat\nscore 0.5"
    long_title = titled[1].split("\n")
    assert len(long_title) == 3 and long_title[1].endswith("...") and long_title[2] == "score 0.25"
    image = pictures.image_grid(images, columns=4, prompts=prompts, scores=[0.0] * 5)
    assert isinstance(image, Image.Image) and image.mode == "RGB"


def test_image_grid_rejects_mismatched_prompts():
    with pytest.raises(ValueError, match="prompts has 2 entries for 3 images"):
        pictures.image_grid(torch.rand(3, 3, 8, 8), prompts=["a", "b"])
