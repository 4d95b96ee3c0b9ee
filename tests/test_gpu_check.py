"""The prepared GPU check runs end to end on the CPU (`--dry-run`), so it cannot rot before a GPU is lent."""

from __future__ import annotations

import json

from flow_grpo.bench.gpu_check import PARTS, main


def test_gpu_check_dry_run_writes_one_table_and_json(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--dry-run", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(results) == set(PARTS) and not any("error" in r for r in results.values())
    assert abs(results["ratio"]["ratio_first"] - 1.0) < 1e-5
    assert results["ratio"]["graphs"] == {"rollout": 2, "policy": 1, "reference": 1}
    assert results["memory"]["update"] > 0 and results["compiled"]["update"]["seconds"] > 0
    assert printed[0].startswith("phase") and printed[-1].startswith("device:")
    assert (tmp_path / "gpu_check.txt").read_text().strip().splitlines() == printed
