"""Daemon configuration: defaults < file < environment < flags, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peerd.config import (
    ClusterConfig,
    ConfigError,
    DaemonConfig,
    SimConfig,
    TrainConfig,
    load_daemon_config,
    member_options,
    parse_size,
    reference_table,
    train_options,
)
from peerd.options import command_line

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    config_file = write(tmp_path / "peerd.toml", 'port = 9100\nmu = 0.25\ncluster = "lab"\n'
                        'peers = ["10.0.0.2:7470"]\nshard = "1/3"\nmdns = false\n')
    environ = {"PEERD_PORT": "9200", "PEERD_MU": "0.125", "HOME": "/root"}
    config = load_daemon_config(config_file, environ, {"port": 9300})
    assert config.port == 9300  # flag beats environment and file
    assert config.mu == 0.125  # environment beats file
    assert config.cluster == "lab" and config.peers == ("10.0.0.2:7470",)
    assert config.shard == (1, 3) and config.mdns is False
    assert config.topology == DaemonConfig().topology  # untouched default


def test_planner_and_contrastive_options_reach_the_daemon(tmp_path: Path) -> None:
    config_file = write(tmp_path / "peerd.toml", 'overlap = "decay:8"\ndrift_period = 4\n'
                        "contrastive = true\ncontrastive_weight = 0.5\n")
    config = load_daemon_config(config_file, {"PEERD_DRIFT_PERIOD": "6"}, {})
    assert config.overlap == "decay:8" and config.drift_period == 6
    train = config.train_config(TrainConfig(lr=0.01))
    assert train.contrastive and train.contrastive_weight == 0.5 and train.lr == 0.01


def test_environment_parsing() -> None:
    config = load_daemon_config(None, {
        "PEERD_PEERS": "a:1, b:2", "PEERD_MDNS": "off", "PEERD_ROUNDS": "7",
        "PEERD_METRICS_PORT": "", "PEERD_ROUND_TIMEOUT_S": "12.5",
    }, {})
    assert config.peers == ("a:1", "b:2") and config.mdns is False and config.rounds == 7
    assert config.metrics_port is None and config.round_timeout_s == 12.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown key 'prot'; allowed: topology"),
        ('port = "x"\n', "port = 'x' is invalid: must be an integer"),
        ("mdns = 1\n", "mdns = 1 is invalid: must be true or false"),
        ("peers = [1]\n", "must be a list of HOST:PORT"),
        ('shard = "4/4"\n', "shard='4/4' is invalid"),
        ("mu = 2\n", "mu=2.0 is invalid: must be in (0, 1]"),
        ("quorum = 1.5\n", "quorum=1.5 is invalid: must be in"),
        ("max_staleness = -1\n", "max_staleness=-1 is invalid: must be >= 0"),
        ("staleness_exponent = -0.5\n", "staleness_exponent=-0.5 is invalid"),
        ("deadline_floor_s = 0\n", "deadline_floor_s=0.0 is invalid: must be > 0"),
        ("deadline_mads = -1\n", "deadline_mads=-1.0 is invalid"),
        ("slowdown = 0.5\n", "slowdown=0.5 is invalid: must be a number >= 1"),
        ("sync = 1\n", "sync = 1 is invalid: must be true or false"),
        ("drift_period = 0\n", "drift_period=0 is invalid: must be >= 1"),
        ('overlap = "decay"\n', "overlap='decay' is invalid: must be static or decay:H"),
        ("contrastive_tau = 0\n", "contrastive_tau=0.0 is invalid: must be a positive number"),
        ("contrastive = true\nearly_exits = true\n",
         "contrastive=True is invalid with early_exits=True"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_daemon_config(write(tmp_path / "bad.toml", text), {}, {})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PEERD_TOPOLGY": "ring"}, "unknown environment variable PEERD_TOPOLGY"),
        ({"PEERD_PORT": "seven"}, "port='seven' is invalid: must be an integer"),
        ({"PEERD_MDNS": "maybe"}, "mdns='maybe' is invalid: must be true or false"),
        ({"PEERD_LOG_LEVEL": "LOUD"}, "log_level='LOUD' is invalid: must be one of DEBUG"),
    ],
)
def test_bad_environment_values_name_the_variable(environ: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_daemon_config(None, environ, {})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_daemon_config(str(tmp_path / "absent.toml"), {}, {})


def test_cli_flags_and_config_command(tmp_path: Path) -> None:
    config_file = write(tmp_path / "peerd.toml", "port = 9100\nrounds = 4\n")
    shown = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "config", "--config", config_file],
        capture_output=True, text=True, timeout=60, check=True,
        env={"PATH": "/usr/bin:/bin", "PEERD_ROUNDS": "6"},
    ).stdout
    assert "port = 9100" in shown and "rounds = 6" in shown and "# peer_id is unset" in shown
    refused = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "start", "--config", config_file, "--port", "x"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert refused.returncode == 2 and "port='x' is invalid" in refused.stderr


def test_reference_doc_is_current() -> None:
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert doc.endswith(reference_table()), "regenerate with: peerd config --reference"
    for name in DaemonConfig.__dataclass_fields__:
        assert f"`{name}`" in doc


@pytest.mark.parametrize(("text", "size"), [
    ("1048576", 2**20), ("800M", 800 * 2**20), ("1.5G", 3 * 2**29), ("512MiB", 512 * 2**20),
    ("64k", 64 * 2**10), (" 2 GB ", 2 * 2**30), ("1T", 2**40),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1G", "0", "1.5X", "one gig", "1e9"])
def test_parse_size_refuses_with_the_text(text: str) -> None:
    with pytest.raises(ConfigError, match=r"size=.* is invalid"):
        parse_size(text)


def test_mu_auto_and_its_budget() -> None:
    config = load_daemon_config(None, {"PEERD_MU": "auto"}, {"memory_budget": "1.5G"})
    assert (config.mu, config.memory_budget) == ("auto", "1.5G")
    assert load_daemon_config(None, {"PEERD_MU": "0.25"}, {}).mu == 0.25
    with pytest.raises(ConfigError, match="memory_budget='1G' is only used with mu auto"):
        DaemonConfig(memory_budget="1G")
    with pytest.raises(ConfigError, match="memory_budget='lots' is invalid"):
        DaemonConfig(mu="auto", memory_budget="lots")
    with pytest.raises(ConfigError, match=r"mu='0\.5,0\.25' is invalid: a daemon has one"):
        load_daemon_config(None, {"PEERD_MU": "0.5,0.25"}, {})
    with pytest.raises(ConfigError, match=r"round_target_s=-1\.0 is invalid"):
        DaemonConfig(mu="auto", round_target_s=-1.0)


def test_mu_auto_from_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "peerd.toml", 'mu = "auto"\nmemory_budget = "800M"\n')
    assert load_daemon_config(path, {}, {}).mu == "auto"
    assert load_daemon_config(write(tmp_path / "b.toml", "mu = 0.25\n"), {}, {}).mu == 0.25
    with pytest.raises(ConfigError, match="mu='big' is invalid"):
        load_daemon_config(write(tmp_path / "c.toml", 'mu = "big"\n'), {}, {})


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ClusterConfig(peers=0), "peers=0 is invalid: must be >= 1"),
    (lambda: ClusterConfig(memory_budget="1G"), "memory_budget='1G' is only used with mu auto"),
    (lambda: ClusterConfig(mu="auto", memory_budget="lots"), "memory_budget='lots' is invalid"),
    (lambda: ClusterConfig(depth=(2,)), "depth=2 needs early_exits"),
    (lambda: ClusterConfig(mu="auto", depth=(2,), early_exits=True),
     "with mu auto and early_exits the probe chooses"),
    (lambda: ClusterConfig(drift_period=0), "drift_period=0 is invalid: must be >= 1"),
    (lambda: SimConfig(train=TrainConfig(early_exits=True)),
     "train.early_exits=True differs from the options"),
])
def test_sim_and_cluster_options_are_checked_like_a_daemons(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_a_training_config_with_its_options_is_accepted() -> None:
    train = TrainConfig(early_exits=True, distill_temperature=None, max_local_steps=2)
    config = SimConfig(depth=(2, 1), train=train, **train_options(train))
    assert config.train_config(TrainConfig()) == train
    assert not config.distill and config.early_exits


def test_cluster_gives_each_daemon_its_options() -> None:
    cluster = ClusterConfig(peers=3, mu=(0.5, 0.25), depth=(2, 1), early_exits=True,
                            overlap="decay:4", sync=True, mdns=False)
    daemons = [DaemonConfig(**member_options(cluster, position)) for position in range(3)]
    assert [(d.mu, d.depth) for d in daemons] == [(0.5, 2), (0.25, 1), (0.5, 2)]
    assert all(d.overlap == "decay:4" and d.sync and not d.mdns and d.rounds == 30
               for d in daemons)
    assert command_line(daemons[1]) == ["--overlap", "decay:4", "--early-exits", "--sync",
                                        "--no-mdns", "--mu", "0.25", "--depth", "1",
                                        "--rounds", "30"]


def test_a_bad_cluster_option_stops_before_any_daemon_starts(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "cluster", "--memory-budget", "1G", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2
    assert "memory_budget='1G' is only used with mu auto (mu is (0.5,))" in refused.stderr
    assert not (tmp_path / "ca").exists()
