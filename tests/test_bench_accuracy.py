"""`peerd bench accuracy --quick`: every table with every row, and what must hold whatever the
accuracy: msfusion's sub-models are smaller, its windows spread over the model, the ring sends
less than the full mesh, and --reuse runs nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peerd.bench.accuracy import BASELINE_MUS, BASELINES, MSFUSION_MUS, TABLES
from peerd.cli import build_parser


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
    for plot in ("a", "b", "c", "e"):
        assert (out / f"accuracy-{plot}.png").stat().st_size > 1000
    for rows in tables.values():
        for row in rows.values():
            assert 0.0 <= row["final_acc"]["median"] <= 1.0
            assert 0.0 <= row["peer_acc"]["median"] <= 1.0
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


@pytest.mark.parametrize(("flag", "value"), [
    ("--tables", "a,z"), ("--seeds", "0,x"), ("--target", "1.5"), ("--partition", "zipf"),
])
def test_bad_options_are_named(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "accuracy", flag, value])
    assert flag.lstrip("-") in capsys.readouterr().err
