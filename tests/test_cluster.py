"""cluster.yaml: valid for Ray's cluster launcher (Ray's own defaults and schema, no network), and safe."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from altgrad.cloud import PLACEHOLDER_GROUP_ID

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def config(raw):
    """The config as `ray up` sees it: merged with Ray's AWS defaults, then validated."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _workers(config):
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_validation_is_real_a_misspelt_key_fails(raw):
    broken = prepare_config({**copy.deepcopy(raw), "max_worker": 3})
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(broken)


def test_the_dashboard_listens_on_localhost_only(config):
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start


def test_every_node_type_names_the_premade_group_so_ray_makes_none(config):
    """Ray makes a group, with SSH from 0.0.0.0/0, for any node type without SecurityGroupIds; the group
    named here is made by `python -m altgrad.cloud security-group` (tests/test_cloud.py runs that path)."""
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"] == [PLACEHOLDER_GROUP_ID]
    assert "security_group" not in config["provider"]  # unused once every node type names its group
    assert CLUSTER.read_text().count(PLACEHOLDER_GROUP_ID) == 1  # one id to fill in, shared by the worker


def test_gpu_workers_autoscale_on_spot_with_one_gpu_each(config):
    (worker,) = _workers(config).values()
    assert worker["resources"]["GPU"] == 1 and worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert worker["node_config"]["IamInstanceProfile"]  # to write results to S3
    assert config["max_workers"] >= worker["max_workers"]
    assert "--gpus all" in config["docker"]["worker_run_options"]
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is on demand
    assert head["resources"] == {"CPU": 0}  # trials never land on it


def test_setup_installs_the_checked_out_commit_and_refuses_local_changes(config):
    assert config["file_mounts"] == {"~/altgrad": "."}
    commands = config["setup_commands"]
    assert any("status --porcelain" in c and "exit 1" in c for c in commands)
    assert any("rev-parse HEAD" in c for c in commands)
    assert any("pip install" in c and "~/altgrad" in c for c in commands)
    assert not any("git+" in c for c in commands)  # no unpinned install from a remote branch
    assert config["docker"]["image"].split(":")[1][0].isdigit()  # a pinned Ray release, not latest
