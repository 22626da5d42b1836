"""`peerd bench accuracy --quick`: every table with every row, and what must hold whatever the
accuracy: msfusion's sub-models are smaller, its windows spread over the model, the ring sends
less than the full mesh, and --reuse runs nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peerd.bench.accuracy import BASELINE_MUS, BASELINES, MSFUSION_MUS, TABLES, seeds_from
from peerd.cli import build_parser, main


def _bench(out: Path, *extra: str) -> dict:
    args = build_parser().parse_args(
        ["bench", "accuracy", "--quick", "--task", "digits", "--seeds", "0", "--peers", "4",
         "--out", str(out), *extra])
    assert args.func(args) == 0
    return json.loads((out / "accuracy.json").read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("accuracy")
    return out, _bench(out)


def test_every_table_has_every_row(quick: tuple[Path, dict]) -> None:
    out, result = quick
    tables = result["tables"]
    assert list(tables) == list(TABLES)
    assert result["metric"] == "accuracy"
    assert result["settings"]["partition"] == "dirichlet:0.5"
    expected_a = ([f"msfusion mu {mu}" for mu in MSFUSION_MUS]
                  + [f"{m} mu {mu}" for m in BASELINES for mu in BASELINE_MUS] + ["full"])
    assert list(tables["a"]) == expected_a
    assert list(tables["b"]) == [f"msfusion mu 0.25 N={n}" for n in (4, 8, 16)]
    assert len(tables["c"]) == 4 and len(tables["d"]) == 2 and len(tables["e"]) == 2
    assert len(tables["sizing"]) == 2
    markdown = (out / "accuracy.md").read_text()
    for table, rows in tables.items():
        assert f"### table {table}" in markdown
        for label in rows:
            assert f"| {label} |" in markdown
    for plot in ("a", "b", "c", "d", "e"):
        assert (out / f"accuracy-{plot}.png").stat().st_size > 1000
    for rows in tables.values():
        for row in rows.values():
            assert 0.0 <= row["final"]["median"] <= 1.0
            assert 0.0 <= row["own"]["median"] <= 1.0
            assert row["seeds"] == [0]


def test_msfusion_sub_models_are_smaller_and_spread(quick: tuple[Path, dict]) -> None:
    rows = quick[1]["tables"]["a"]
    full = rows["full"]["flops_per_sample_peer"]
    assert rows["full"]["coverage"] == 1.0
    assert full == rows["full"]["flops_per_sample_full"]
    for mu in MSFUSION_MUS:
        msfusion = rows[f"msfusion mu {mu}"]
        # FLOPs fall about as mu^2 (the sliced layers dominate).
        assert msfusion["flops_per_sample_peer"] < 2 * mu * mu * full
        assert msfusion["flops_per_sample_peer"] == rows[f"heterofl mu {mu}"][
            "flops_per_sample_peer"]
        # Shifted windows reach more of the model than a static prefix or one shared window.
        assert msfusion["coverage"] > rows[f"heterofl mu {mu}"]["coverage"]
        assert msfusion["coverage"] > rows[f"fedrolex mu {mu}"]["coverage"]


def test_ring_sends_less_than_full_mesh_and_central_sends_nothing(
    quick: tuple[Path, dict],
) -> None:
    tables = quick[1]["tables"]
    ring = tables["d"]["msfusion mu 0.25 ring"]["bytes_per_round_peer"]["median"]
    mesh = tables["d"]["msfusion mu 0.25 full"]["bytes_per_round_peer"]["median"]
    assert 0 < ring < mesh
    for row in tables["sizing"].values():
        assert row["bytes_per_round_peer"]["median"] == 0
    # The same run serves every table that needs it.
    assert tables["e"]["msfusion mu 0.25"] == tables["a"]["msfusion mu 0.25"]


def test_reuse_runs_nothing_again(quick: tuple[Path, dict], capsys) -> None:
    out, result = quick
    capsys.readouterr()
    again = _bench(out, "--reuse", "--tables", "e,d")
    assert "run " not in capsys.readouterr().out
    assert again["tables"]["e"] == result["tables"]["e"]


def test_kjv_is_scored_by_perplexity_on_whole_books(tmp_path: Path) -> None:
    """A perplexity target is reached by falling to it: 1000 is below any model's perplexity
    after a step (about the vocabulary's size, some 60), 1.0 is never reached."""
    result = _bench(tmp_path, "--task", "kjv", "--peers", "2", "--tables", "sizing,e",
                    "--target", "1000")
    assert result["metric"] == "perplexity"
    assert result["settings"]["partition"] == "natural"
    for rows in result["tables"].values():
        for row in rows.values():
            assert 1.0 < row["final"]["median"] < 1000
            assert row["reached"] == 1
    for row in result["tables"]["e"].values():  # each peer's sub-model on the test books
        assert 1.0 < row["sub_models"]["median"] < 1000
    never = _bench(tmp_path, "--task", "kjv", "--peers", "2", "--tables", "e", "--target", "1",
                   "--reuse")
    assert all(row["reached"] == 0 for row in never["tables"]["e"].values())
    assert "| row | final ppl | own ppl |" in (tmp_path / "accuracy.md").read_text()


@pytest.mark.parametrize(("flag", "value"), [
    ("--tables", "a,z"), ("--seeds", "0,x"), ("--target", "-2"), ("--target", "nan"),
    ("--partition", "zipf"), ("--budget-gflops", "0"), ("--budget-gflops", "inf"),
])
def test_bad_options_are_named(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "accuracy", flag, value])
    assert flag.lstrip("-") in capsys.readouterr().err


@pytest.mark.parametrize(("task", "target", "bound"), [
    ("fmnist", "1.5", "accuracy must be in (0, 1]"),
    ("kjv", "0.5", "perplexity must be at least 1"),
])
def test_a_target_outside_the_tasks_metric_is_named(
    task: str, target: str, bound: str, tmp_path: Path, capsys,
) -> None:
    argv = ["bench", "accuracy", "--quick", "--task", task, "--target", target,
            "--out", str(tmp_path)]
    assert main(argv) == 2
    assert f"target={float(target)} is invalid: a target {bound}" in capsys.readouterr().err
    assert not (tmp_path / "accuracy.json").exists()


# digits --quick on 4 peers: a round costs the mean peer about 0.017 GFLOPs at mu 0.25 and
# 0.067 at mu 0.5, so this budget is 2 rounds at mu 0.25 and 1 at mu 0.5.
TINY_BUDGET_GFLOPS = 0.03


def test_a_budget_gives_every_row_the_same_per_peer_compute(tmp_path: Path) -> None:
    """Table f under --budget-gflops: every run stops at the first round whose cumulative
    per-peer training FLOPs (as peerd sim counts them) reach the budget, so the narrow rows
    train more rounds; three seeds by default; each method is scored by what it delivers."""
    result = _bench(tmp_path, "--tables", "f", "--budget-gflops", str(TINY_BUDGET_GFLOPS),
                    "--seeds", "0,1,2")
    budget = TINY_BUDGET_GFLOPS * 1e9
    for key, run in result["runs"].items():
        records = [json.loads(line) for line in
                   (tmp_path / "runs" / key / "metrics.jsonl").read_text().splitlines()]
        spent = [r["train_flops_cum_peer_mean"] for r in records]
        assert spent[-1] >= budget, key
        assert len(spent) == 1 or spent[-2] < budget, key
        assert run["rounds"] == len(records)
    rows = result["tables"]["f"]
    assert list(rows) == ["msfusion mu 0.25", "msfusion mu 0.5", "fedrolex mu 0.25",
                          "heterofl mu 0.25", "fd mu 0.25"]
    assert rows["msfusion mu 0.25"]["rounds"]["median"] == 2
    assert rows["msfusion mu 0.5"]["rounds"]["median"] == 1
    for label, row in rows.items():
        assert row["seeds"] == [0, 1, 2]
        delivered = "sub_models" if label.split()[0] in ("heterofl", "fd") else "final"
        assert row["delivers"] == ("sub-model" if delivered == "sub_models" else "assembled")
        assert row["delivered"] == row[delivered]
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "GFLOPs of training per peer (rounds follow)" in markdown
    assert "| heterofl mu 0.25 | 0.27 | 2 | sub-model |" in markdown


def test_a_budget_excludes_rounds(tmp_path: Path, capsys) -> None:
    argv = ["bench", "accuracy", "--quick", "--budget-gflops", "1", "--rounds", "3",
            "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--rounds and --budget-gflops exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "accuracy.json").exists()


@pytest.mark.parametrize(("extra", "seeds"), [
    ([], (0, 1)), (["--budget-gflops", "5"], (0, 1, 2)),
    (["--budget-gflops", "5", "--seeds", "4"], (4,)),
])
def test_a_budget_defaults_to_three_seeds(extra: list[str], seeds: tuple[int, ...]) -> None:
    args = build_parser().parse_args(["bench", "accuracy", *extra])
    assert seeds_from(args) == seeds


def test_a_drift_period_reaches_only_msfusions_runs(tmp_path: Path, capsys) -> None:
    """--drift-period R: msfusion's runs are keyed and configured with R (a faster drift covers
    more of the model in the same rounds); the full-width run is the one a default-period
    bench stores, so --reuse shares it between periods."""
    fast = _bench(tmp_path, "--tables", "e", "--drift-period", "2")
    capsys.readouterr()
    default = _bench(tmp_path, "--tables", "e", "--reuse")
    fast_key = "msfusion-mu0.25-n4-ring-nocon-static-s0"
    full_key = "full-mu1.0-n4-ring-nocon-static-s0"
    announced = capsys.readouterr().out  # the runs trained, not read back
    assert f"run {fast_key}\n" in announced
    assert f"run {full_key}" not in announced
    assert {path.name for path in (tmp_path / "runs").iterdir()} == {
        fast_key + "-r2", fast_key, full_key}
    stored = {key: json.loads((tmp_path / "runs" / key / "config.json").read_text())
              for key in (fast_key + "-r2", fast_key, full_key)}
    assert stored[fast_key + "-r2"]["drift_period"] == 2
    assert stored[fast_key]["drift_period"] == stored[full_key]["drift_period"] == 64
    assert fast["runs"][fast_key]["coverage"] > default["runs"][fast_key]["coverage"]
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "drift period 64" in markdown


def test_whole_groups_reach_only_msfusions_runs(tmp_path: Path) -> None:
    """--whole-groups: msfusion's run is keyed and configured with the groups (rows with and
    without them never share a folder); the full-width run stays the default one."""
    result = _bench(tmp_path, "--tables", "e", "--whole-groups", "res1,res0")
    key = "msfusion-mu0.25-n4-ring-nocon-static-s0-whole-res0+res1"
    full_key = "full-mu1.0-n4-ring-nocon-static-s0"
    assert {path.name for path in (tmp_path / "runs").iterdir()} == {key, full_key}
    stored = {name: json.loads((tmp_path / "runs" / name / "config.json").read_text())
              for name in (key, full_key)}
    assert stored[key]["whole_groups"] == "res0,res1"
    assert stored[full_key]["whole_groups"] is None
    # A quarter of the mid groups' width but the whole residual width: above mu^2 of the FLOPs.
    figures = result["runs"]["msfusion-mu0.25-n4-ring-nocon-static-s0"]
    assert figures["flops_per_sample_peer"] > 0.15 * figures["flops_per_sample_full"]
    assert "msfusion keeps res0,res1 whole" in (tmp_path / "accuracy.md").read_text()


def test_rank_drift_rates_reach_only_msfusions_runs(tmp_path: Path) -> None:
    """--drift-rates rank (the default is colour): msfusion's run is keyed `-rank` and
    configured so; the full-width run is the default one (its windows do not drift)."""
    result = _bench(tmp_path, "--tables", "e", "--drift-rates", "rank")
    ranked_key = "msfusion-mu0.25-n4-ring-nocon-static-s0"
    full_key = "full-mu1.0-n4-ring-nocon-static-s0"
    assert set(result["runs"]) == {ranked_key, full_key}
    assert {path.name for path in (tmp_path / "runs").iterdir()} == {ranked_key + "-rank",
                                                                      full_key}
    stored = {key: json.loads((tmp_path / "runs" / key / "config.json").read_text())
              for key in (ranked_key + "-rank", full_key)}
    assert stored[ranked_key + "-rank"]["drift_rates"] == "rank"
    assert stored[full_key]["drift_rates"] == "colour"
    assert "drift period 64 (rank rates)" in (tmp_path / "accuracy.md").read_text()
