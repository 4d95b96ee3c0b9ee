"""The GenEval rules on one image's detections: the training score, strict and official correctness.

A GenEval prompt carries its requirements in its metadata (``*_metadata.jsonl`` lines)::

    {"tag": "position", "include": [{"class": "dog", "count": 1},
                                    {"class": "cat", "count": 1, "position": ["left of", 0]}],
     "exclude": [{"class": "dog", "count": 2}]}

The objects of a class are its detections scoring above the confidence threshold (a higher one for
the ``counting`` tag), most confident first, at most ``max_objects`` (16). Three rules judge them:

- :func:`evaluate_geneval`, the official GenEval correctness (0/1): every ``include`` entry has at
  least ``count`` objects; with ``color``, each of the ``count`` most confident has that colour;
  with ``position = [relation, i]``, each of them stands in ``relation`` to each object of include
  entry ``i``; and no ``exclude`` entry has ``count`` objects or more.
- :func:`geneval_partial`, the training score of the public TP-GRPO / Flow-GRPO code
  (``evaluate_reward`` in its ``flow_grpo/geneval_utils.py``), and its *strict* correctness. Per
  include entry with ``n = count`` and ``found`` objects, it appends ``1 - |n - found| / n``;
  if ``found != n`` the image is not strictly correct and, when the entry also asks for a colour or a
  position, it appends 0. Otherwise a colour appends ``1 - |n - k| / n`` with ``k`` the objects of
  that colour (not strict when ``k != n``); a position (when the entry still matches) appends 0 if
  its target entry did not match, else tests each object against each target object, appends 0 at
  the first relation that fails, and then appends 1 (in both cases, as the public code does). The
  score is the mean of what was appended; ``exclude`` entries are ignored. The score is negative when
  far more objects than asked for are found (``1 - |1 - 4| / 1 = -2``), as in the public code.

Relations follow GenEval's rule: the offset between box centres, shrunk on each axis by
``position_margin`` times the sum of the two boxes' sizes, must point mostly along the relation's
direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flow_grpo.reward_server.detectors import Detection
from flow_grpo.reward_server.server import ScorerInputError

__all__ = [
    "ColorOf",
    "check_metadata",
    "color_requests",
    "evaluate_geneval",
    "geneval_partial",
    "objects_by_class",
    "relative_position",
]

ColorOf = Callable[[Detection], str]
"""Returns the colour name of a detected object (the scorer binds it to the image)."""


def relative_position(box: Sequence[float], target: Sequence[float], margin: float = 0.1) -> set[str]:
    """Relations of ``box`` to ``target`` among "left of", "right of", "above", "below".

    Args:
        box, target: ``(x0, y0, x1, y1)`` in pixels (y grows downwards).
        margin: per axis, ``margin * (size_box + size_target)`` of the centre offset is ignored.

    Returns:
        The relations whose direction the shrunk offset points along (its component on that axis is
        more than half its length); empty when the shrunk offset is zero.
    """
    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    target_center = ((target[0] + target[2]) / 2, (target[1] + target[3]) / 2)
    sizes = (box[2] - box[0] + target[2] - target[0], box[3] - box[1] + target[3] - target[1])
    offset = [center[axis] - target_center[axis] for axis in (0, 1)]
    shrunk = [max(abs(offset[axis]) - margin * sizes[axis], 0.0) * (1 if offset[axis] > 0 else -1) for axis in (0, 1)]
    if abs(shrunk[0]) < 1e-3 and abs(shrunk[1]) < 1e-3:
        return set()
    # Direction of the shrunk offset, scaled by the raw offset's length as GenEval does.
    length = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = shrunk[0] / length, shrunk[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def objects_by_class(detections: Sequence[Detection], cutoff: float, max_objects: int) -> dict[str, list[Detection]]:
    """Detections scoring above ``cutoff`` per lower-cased class, most confident first, at most ``max_objects``.

    The comparison is strict (``score > cutoff``), as GenEval's evaluator keeps boxes.
    """
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        if detection.score > cutoff:
            found = by_class.setdefault(detection.label.lower(), [])
            if len(found) < max_objects:
                found.append(detection)
    return by_class


def check_metadata(metadata: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """``(include, exclude)`` of GenEval metadata; raises :class:`ScorerInputError` on anything else.

    A ``position`` must name an earlier include entry, as GenEval's metadata always does.
    """
    include = metadata.get("include")
    exclude = metadata.get("exclude", [])
    if not isinstance(include, list) or not include or not isinstance(exclude, list):
        raise ScorerInputError(
            "GenEval needs the prompt metadata 'include' (a non-empty list) and optionally 'exclude'; "
            f"got keys {sorted(metadata)}. Train on the GenEval *_metadata.jsonl prompts."
        )
    for entry in [*include, *exclude]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("class"), str):
            raise ScorerInputError(f"Every GenEval include/exclude entry needs a 'class', got {entry!r}.")
        if not isinstance(entry.get("count", 1), int) or entry.get("count", 1) < 1:
            raise ScorerInputError(f"A GenEval 'count' must be a positive integer, got {entry!r}.")
    for index, entry in enumerate(include):
        if "position" in entry:
            position = entry["position"]
            if not isinstance(position, Sequence) or len(position) != 2 or not isinstance(position[1], int):
                raise ScorerInputError(f"A GenEval 'position' is [relation, include index], got {position!r}.")
            if not 0 <= position[1] < index:
                raise ScorerInputError(
                    f"Position target {position[1]} of include entry {index} must be an earlier include entry."
                )
    return include, exclude


def _cutoff(metadata: Mapping[str, Any], threshold: float, counting_threshold: float) -> float:
    return counting_threshold if metadata.get("tag") == "counting" else threshold


def _official_matches(
    include: Sequence[Mapping[str, Any]], by_class: Mapping[str, list[Detection]]
) -> list[list[Detection]] | str:
    """Per include entry its ``count`` most confident objects, or the reason one has too few."""
    matched: list[list[Detection]] = []
    for entry in include:
        name, count = entry["class"].lower(), int(entry.get("count", 1))
        found = by_class.get(name, [])
        if len(found) < count:
            return f"expected {count} {name}, found {len(found)}"
        matched.append(found[:count])
    return matched


def color_requests(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
) -> list[Detection]:
    """The detections whose colour :func:`evaluate_geneval` or :func:`geneval_partial` may ask for.

    Per include entry with a colour and at least ``count`` objects, its ``count`` most confident ones
    (the partial score asks only when there are exactly ``count``, the same objects).
    """
    include, _ = check_metadata(metadata)
    by_class = objects_by_class(detections, _cutoff(metadata, threshold, counting_threshold), max_objects)
    wanted = []
    for entry in include:
        found = by_class.get(entry["class"].lower(), [])
        if "color" in entry and len(found) >= int(entry.get("count", 1)):
            wanted.extend(found[: int(entry.get("count", 1))])
    return wanted


def _need_colors(color_of: ColorOf | None) -> ColorOf:
    if color_of is None:
        raise ScorerInputError("The prompt asks for colours but the scorer has no colour classifier.")
    return color_of


def evaluate_geneval(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    color_of: ColorOf | None = None,
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_margin: float = 0.1,
    max_objects: int = 16,
) -> tuple[bool, str]:
    """Official GenEval correctness of one image (see the module docstring).

    Args:
        metadata: the prompt's metadata with ``include`` (and optionally ``exclude``, ``tag``).
        detections: every detection in the image (any confidence).
        color_of: colour classifier, needed when an include entry has ``color``.
        max_objects: at most this many detections per class count (the most confident).

    Returns:
        ``(correct, reason)``; ``reason`` names the first unmet requirement.

    Raises:
        ScorerInputError: when the metadata is not GenEval metadata.
    """
    include, exclude = check_metadata(metadata)
    by_class = objects_by_class(detections, _cutoff(metadata, threshold, counting_threshold), max_objects)
    matched = _official_matches(include, by_class)
    if isinstance(matched, str):
        return False, matched
    for entry, found in zip(include, matched, strict=True):
        if "color" in entry:
            colors = [_need_colors(color_of)(d) for d in found]
            if any(color != entry["color"] for color in colors):
                return False, f"expected {entry['color']} {entry['class']}, found {colors}"
    for entry, found in zip(include, matched, strict=True):
        if "position" in entry:
            relation, target_index = entry["position"]
            for detection in found:
                for target in matched[target_index]:
                    if relation not in relative_position(detection.box, target.box, position_margin):
                        return False, f"expected {entry['class']} {relation} {include[target_index]['class']}"
    for entry in exclude:
        name, count = entry["class"].lower(), int(entry.get("count", 1))
        if len(by_class.get(name, [])) >= count:
            return False, f"expected fewer than {count} {name}"
    return True, "correct"


def _position_terms(
    found: Sequence[Detection], targets: Sequence[Detection] | None, relation: str, margin: float
) -> tuple[list[float], bool]:
    """What a matched entry's position appends to the partial score, and whether it still matches."""
    if targets is None:
        return [0.0], False
    for detection in found:
        for target in targets:
            if relation not in relative_position(detection.box, target.box, margin):
                # The public code appends 0 at the first failing relation and then 1 all the same.
                return [0.0, 1.0], False
    return [1.0], True


def geneval_partial(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    color_of: ColorOf | None = None,
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_margin: float = 0.1,
    max_objects: int = 16,
) -> tuple[float, bool]:
    """The public code's GenEval training score of one image and its strict correctness.

    Arguments as :func:`evaluate_geneval`. Returns ``(score, strict)``: the mean of the per-entry terms
    of the module docstring (at most 1, negative with many surplus objects) and whether every include
    entry matched exactly (counts equal, colours and positions right; ``exclude`` is not looked at).
    """
    include, _ = check_metadata(metadata)
    by_class = objects_by_class(detections, _cutoff(metadata, threshold, counting_threshold), max_objects)
    terms: list[float] = []
    strict = True
    groups: list[list[Detection] | None] = []  # per include entry: its objects when it matched
    for entry in include:
        count = int(entry.get("count", 1))
        found = by_class.get(entry["class"].lower(), [])
        terms.append(1.0 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            terms.extend([0.0] if "color" in entry or "position" in entry else [])
        if matched and "color" in entry:
            colored = sum(_need_colors(color_of)(d) == entry["color"] for d in found)
            terms.append(1.0 - abs(count - colored) / count)
            matched = colored == count
        if matched and "position" in entry:
            relation, target_index = entry["position"]
            position_terms, matched = _position_terms(found, groups[target_index], relation, position_margin)
            terms.extend(position_terms)
        strict = strict and matched
        groups.append(found if matched else None)
    return sum(terms) / len(terms), strict
