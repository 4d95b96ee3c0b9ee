"""The prepared GPU check runs end to end on the CPU (`--dry-run`), so it cannot rot before a GPU is lent."""

from __future__ import annotations

import json
from pathlib import Path

from flow_grpo.bench.gpu_check import LIMITS_S, PARTS, main
from flow_grpo.bench.wheels import wheels_to_install

CHECK_BUDGET_S = 480.0


def test_gpu_check_dry_run_writes_one_table_and_json(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--dry-run", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results) == list(PARTS) and not any("error" in r for r in results.values())
    compiled = results["compiled"]
    # The ratio ran in the compiled part's process, on its graphs: nothing recompiled.
    assert abs(compiled["ratio"]["ratio_first"] - 1.0) < 1e-5 and compiled["recompiled_in_ratio_run"] is False
    assert compiled["graphs"] == {"rollout": 2, "policy": 1, "reference": 1}
    assert len(compiled["graphs_by_kind"]) == 2  # the tiny SD3 transformer's two block kinds
    assert results["memory"]["update"] > 0 and compiled["update"]["seconds"] > 0
    assert compiled["update"]["compile_seconds"] is not None
    assert printed[0].startswith("phase") and "GiB" in printed[0] and printed[-1].startswith("device:")
    assert (tmp_path / "gpu_check.txt").read_text().strip().splitlines() == printed


def test_limits_fit_the_budget_cheap_parts_first() -> None:
    assert sum(LIMITS_S.values()) <= CHECK_BUDGET_S and set(LIMITS_S) == set(PARTS)
    assert PARTS[:2] == ("memory", "eager")  # the memory comparison and the eager table come first


def test_shipped_wheels_are_picked_for_missing_modules(tmp_path: Path) -> None:
    for name in ("diffusers-0.41.0-py3-none-any.whl", "diffusers-0.42.1-py3-none-any.whl",
                 "ml_collections-1.1.0-py3-none-any.whl", "absl_py-2.1.0-py3-none-any.whl", "torch-2.11-cp311.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen, unmatched = wheels_to_install(tmp_path, ["diffusers", "ml_collections", "absl", "peft"])
    assert [w.name for w in chosen] == [
        "diffusers-0.42.1-py3-none-any.whl", "ml_collections-1.1.0-py3-none-any.whl", "absl_py-2.1.0-py3-none-any.whl",
    ]
    assert unmatched == ["peft"]
    assert wheels_to_install(tmp_path / "absent", ["diffusers"]) == ([], ["diffusers"])
