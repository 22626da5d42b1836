"""One declaration, every surface: an option added to peerd/config.py alone reaches the flags of
`peerd sim`, `peerd cluster` and `peerd start`, the config file, its PEERD_* variable,
`peerd config`, the reference table, the command lines `peerd cluster` starts daemons with and
the agreement fingerprint (docs/CONFIG.md, "Adding an option", is this test's worked example).

The test edits a copy of the package exactly as a developer would (one field in `PeerOptions`)
and drives the copy through real `peerd` processes; nothing else in the copy changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The worked example of docs/CONFIG.md: an agreed option of every peer, checked >= 1.
DECLARATION = '''\
    gossip_fanout: int = option(3, "neighbours each slice is also forwarded to" + SAME,
                                agreed=True, rule=at_least(1))
'''
# A planner's own option: only msfusion reads it, so only msfusion's fingerprint covers it.
PLANNER_DECLARATION = '''\
    window_jitter: int = option(0, "msfusion: units a window start may move each round" + SAME,
                                agreed=True, planner="msfusion", rule=at_least(0))
'''
ANCHOR = "    width_penalty: float = option("


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package whose PeerOptions declares the two new options."""
    root = tmp_path_factory.mktemp("edited")
    shutil.copytree(ROOT / "peerd", root / "peerd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = root / "peerd" / "config.py"
    text = config.read_text()
    assert text.count(ANCHOR) == 1
    config.write_text(text.replace(ANCHOR, DECLARATION + PLANNER_DECLARATION + ANCHOR))
    changed = [path.relative_to(root) for path in (root / "peerd").rglob("*.py")
               if path.read_bytes() != (ROOT / path.relative_to(root)).read_bytes()]
    assert changed == [Path("peerd/config.py")]
    return root


def peerd(root: Path, *args: str, env: dict[str, str] | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": os.environ["PATH"], "PYTHONPATH": str(root), "COLUMNS": "300",
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "peerd.cli", *args], cwd=root, env=environ,
                          capture_output=True, text=True, timeout=60, check=check)


def python(root: Path, code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=60, check=True,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(root)}).stdout


@pytest.mark.parametrize("command", ["sim", "cluster", "start"])
def test_a_new_option_is_a_flag_of_every_command(edited: Path, command: str) -> None:
    shown = peerd(edited, command, "--help").stdout
    assert "--gossip-fanout GOSSIP_FANOUT" in shown
    assert "neighbours each slice is also forwarded to; the same on every member" in shown
    assert "(default: 3)" in shown


def test_a_new_option_is_parsed_and_checked_by_every_command(edited: Path) -> None:
    parsed = python(edited, """
from peerd.cli import build_parser, config_from_args
from peerd.config import ClusterConfig, SimConfig
for command, kind in (("sim", SimConfig), ("cluster", ClusterConfig)):
    args = build_parser(command, every=False).parse_args([command, "--gossip-fanout", "4"])
    print(command, config_from_args(kind, args).gossip_fanout)
""")
    assert parsed.split("\n")[:2] == ["sim 4", "cluster 4"]
    for command in ("sim", "cluster", "start"):
        refused = peerd(edited, command, "--gossip-fanout", "0", check=False)
        assert refused.returncode == 2
        assert "gossip_fanout=0 is invalid: must be >= 1" in refused.stderr


def test_a_new_option_reads_from_the_file_and_the_environment(edited: Path) -> None:
    config_file = edited / "peerd.toml"
    config_file.write_text("gossip_fanout = 5\n")
    assert "gossip_fanout = 3" in peerd(edited, "config").stdout.splitlines()
    from_file = peerd(edited, "config", "--config", str(config_file)).stdout
    assert "gossip_fanout = 5" in from_file.splitlines()
    from_env = peerd(edited, "config", "--config", str(config_file),
                     env={"PEERD_GOSSIP_FANOUT": "6"}).stdout
    assert "gossip_fanout = 6" in from_env.splitlines()
    bad = peerd(edited, "config", env={"PEERD_GOSSIP_FANOUT": "many"}, check=False)
    assert bad.returncode == 2 and "gossip_fanout='many' is invalid: must be an integer" in \
        bad.stderr
    config_file.write_text('gossip_fanout = "5"\n')
    bad = peerd(edited, "config", "--config", str(config_file), check=False)
    assert bad.returncode == 2 and "gossip_fanout = '5' is invalid: must be an integer" in \
        bad.stderr


def test_a_new_option_is_in_the_reference_table(edited: Path) -> None:
    table = peerd(edited, "config", "--reference").stdout
    assert ("| `gossip_fanout` | `--gossip-fanout` | `PEERD_GOSSIP_FANOUT` | 3 | "
            "start, cluster, sim | yes |") in table
    assert ("| `window_jitter` | `--window-jitter` | `PEERD_WINDOW_JITTER` | 0 | "
            "start, cluster, sim | with msfusion |") in table


def test_cluster_passes_a_new_option_to_its_daemons(edited: Path) -> None:
    shown = python(edited, """
from peerd.config import ClusterConfig, DaemonConfig, member_options
from peerd.options import command_line
config = ClusterConfig(gossip_fanout=5, mu=(0.5, 0.25))
for position in range(2):
    print(" ".join(command_line(DaemonConfig(**member_options(config, position)))))
""").splitlines()
    assert shown == ["--gossip-fanout 5 --rounds 30", "--gossip-fanout 5 --mu 0.25 --rounds 30"]


def test_the_fingerprint_covers_exactly_the_agreed_options(edited: Path) -> None:
    shown = python(edited, """
from peerd.agreement import agreed_settings, cluster_fingerprint, fingerprint_mismatch
from peerd.config import DaemonConfig, planner_options
def printed(**values):
    return cluster_fingerprint("m", agreed_settings(DaemonConfig(**values)))
print(sorted(agreed_settings(DaemonConfig())))
print(sorted(agreed_settings(DaemonConfig(method="fedrolex"))))
print(printed() != printed(gossip_fanout=4), printed() != printed(window_jitter=2))
print(printed(method="fd") == printed(method="fd", window_jitter=2))
print(printed() == printed(port=9000, mu=0.25, contrastive=True))
print(planner_options(DaemonConfig(window_jitter=2)))
print(fingerprint_mismatch(printed(gossip_fanout=4), printed()))
""").splitlines()
    assert shown[0] == str(sorted(["method", "seed", "reduce_scatter", "overlap", "drift_period",
                                   "drift_rates", "layout", "whole_groups", "gossip_fanout",
                                   "window_jitter"]))
    assert shown[1] == str(sorted(["method", "seed", "reduce_scatter", "gossip_fanout"]))
    assert shown[2:5] == ["True True", "True", "True"]
    assert shown[5] == ("{'overlap': 'static', 'drift_period': 64, 'drift_rates': 'colour', "
                        "'layout': 'ring', 'whole_groups': None, 'window_jitter': 2}")
    assert "gossip_fanout and window_jitter must be the same on every member" in shown[6]


def test_the_worked_example_in_the_docs_is_this_test() -> None:
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    for line in (DECLARATION + PLANNER_DECLARATION).splitlines():
        assert line.strip() in doc
