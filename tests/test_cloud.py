"""The README's cluster path against a mocked AWS (moto): `python -m altgrad.cloud security-group`, then
the bootstrap `ray up` runs (Ray's own code) on the shipped cluster.yaml, and what ingress that leaves."""

import copy
import ipaddress
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws
from ray.autoscaler._private.aws import utils as ray_aws_utils
from ray.autoscaler._private.commands import _bootstrap_config

from altgrad import cloud

CLUSTER_TEXT = (Path(__file__).resolve().parents[1] / "cluster.yaml").read_text()
REGION = yaml.safe_load(CLUSTER_TEXT)["provider"]["region"]
WORLD = {"0.0.0.0/0", "::/0"}


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """A mocked, empty AWS account (a default VPC with its subnets), offline, with fake credentials."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes the SSH key it makes to ~/.ssh
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


@pytest.fixture
def ec2(aws):
    """The mocked account as `ray up` finds it the second time: Ray's head instance profile exists (made
    here so that Ray does not make it and sleep 2 x 15 s "for propagation")."""
    iam = boto3.client("iam", region_name=REGION)
    iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
    iam.add_role_to_instance_profile(InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1")
    caches = (ray_aws_utils.resource_cache, ray_aws_utils.client_cache)
    for cache in caches:  # Ray caches boto3 clients: make them inside this mock
        cache.cache_clear()
    yield aws
    for cache in caches:
        cache.cache_clear()


def make_group(capsys, *cidrs) -> tuple[str, str]:
    """The group id the command prints, and what it reports having changed."""
    assert cloud.main(["security-group", "--region", REGION, *[f"--cidr={c}" for c in cidrs]]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1  # the id alone, for SG=$(...)
    return captured.out.strip(), captured.err


def ray_up_bootstrap(cluster_text: str) -> dict:
    """What `ray up` resolves the config to (it calls this before launching anything)."""
    return _bootstrap_config(yaml.safe_load(cluster_text), no_config_cache=True)


def filled_in(group_id: str) -> str:
    """cluster.yaml edited as its comment and the README say: the placeholder replaced by the id."""
    assert CLUSTER_TEXT.count(cloud.PLACEHOLDER_GROUP_ID) == 1
    return CLUSTER_TEXT.replace(cloud.PLACEHOLDER_GROUP_ID, group_id)


def groups(ec2) -> dict:
    return {g["GroupId"]: g for g in ec2.describe_security_groups()["SecurityGroups"]}


def world_open(ec2) -> list:
    """Every (group, protocol, port) with an ingress rule from anywhere, in any group of the account."""
    return [(g["GroupName"], rule["IpProtocol"], rule.get("FromPort"))
            for g in groups(ec2).values() for rule in g["IpPermissions"]
            if WORLD & ({r["CidrIp"] for r in rule["IpRanges"]} | {r["CidrIpv6"] for r in rule["Ipv6Ranges"]})]


def ssh_sources(group) -> set:
    return {r.get("CidrIp") or r.get("CidrIpv6")
            for rule in group["IpPermissions"] if (rule["IpProtocol"], rule.get("FromPort")) == ("tcp", 22)
            for r in rule["IpRanges"] + rule["Ipv6Ranges"]}


def assert_only_ssh_and_the_group_itself(group, cidrs):
    assert ssh_sources(group) == set(cidrs)
    by_protocol = {rule["IpProtocol"]: rule for rule in group["IpPermissions"]}
    assert set(by_protocol) == {"tcp", "-1"}
    assert by_protocol["tcp"]["ToPort"] == 22 and not by_protocol["tcp"]["UserIdGroupPairs"]
    intra = by_protocol["-1"]  # all traffic, from members of this same group only
    assert [pair["GroupId"] for pair in intra["UserIdGroupPairs"]] == [group["GroupId"]]
    assert not intra["IpRanges"] and not intra["Ipv6Ranges"] and not intra["PrefixListIds"]


def test_the_readme_path_opens_ssh_to_the_given_ranges_only(ec2, capsys):
    cidrs = ["203.0.113.7/32", "2001:db8:1::/48"]
    group_id, _ = make_group(capsys, *cidrs)
    before = copy.deepcopy(groups(ec2))
    config = ray_up_bootstrap(filled_in(group_id))
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"] == [group_id]
    assert groups(ec2) == before  # Ray made no group and wrote no rule
    assert world_open(ec2) == []
    assert_only_ssh_and_the_group_itself(groups(ec2)[group_id], cidrs)
    subnets = {s["SubnetId"]: s["VpcId"] for s in ec2.describe_subnets()["Subnets"]}
    for node_type in config["available_node_types"].values():  # Ray launches into the group's VPC
        assert {subnets[s] for s in node_type["node_config"]["SubnetIds"]} == {before[group_id]["VpcId"]}


def test_the_shipped_placeholder_stops_ray_up_before_it_makes_a_group(ec2, capsys):
    before = groups(ec2)
    with pytest.raises(AssertionError):
        ray_up_bootstrap(CLUSTER_TEXT)
    assert "Failed to detect a security group" in capsys.readouterr().err
    assert groups(ec2) == before
    assert ec2.describe_instances()["Reservations"] == []


def test_a_rerun_reuses_the_group_and_changes_nothing(aws, capsys):
    group_id, created = make_group(capsys, "203.0.113.7/32")
    assert "created" in created
    rules = groups(aws)[group_id]["IpPermissions"]
    assert make_group(capsys, "203.0.113.7/32") == (group_id, f"{cloud.GROUP_NAME} {group_id}: unchanged\n")
    assert groups(aws)[group_id]["IpPermissions"] == rules
    assert len(groups(aws)) == 2  # the VPC's default group and ours


def test_a_rerun_fixes_a_group_ray_made_open_and_follows_a_new_address(ec2, capsys):
    """The hazard itself: no node type names a group, so `ray up` makes one (named as the old cluster.yaml
    did) and opens SSH to the world in it. The command reuses that group and closes it."""
    raw = yaml.safe_load(CLUSTER_TEXT)
    for node_type in raw["available_node_types"].values():
        del node_type["node_config"]["SecurityGroupIds"]
    raw["provider"]["security_group"] = {"GroupName": cloud.GROUP_NAME}
    (old_id,) = ray_up_bootstrap(yaml.safe_dump(raw))["available_node_types"]["head"]["node_config"]["SecurityGroupIds"]
    assert world_open(ec2) == [(cloud.GROUP_NAME, "tcp", 22)]
    capsys.readouterr()  # Ray's log
    assert make_group(capsys, "203.0.113.7/32")[0] == old_id
    group_id, changes = make_group(capsys, "198.51.100.0/24")
    assert group_id == old_id
    assert "revoked tcp 22 from 203.0.113.7/32" in changes and "allowed tcp 22 from 198.51.100.0/24" in changes
    assert world_open(ec2) == []
    assert_only_ssh_and_the_group_itself(groups(ec2)[old_id], ["198.51.100.0/24"])


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/8", "2001:db8::/32",
                                  "203.0.113.7", "203.0.113.7/24", "300.1.2.3/32", "203.0.113.7/33", "my-laptop"])
def test_the_world_and_malformed_ranges_are_refused_with_one_line_and_exit_2(monkeypatch, capsys, cidr):
    def no_aws(*args, **kwargs):
        raise AssertionError("refused input reached AWS")

    monkeypatch.setattr(boto3, "client", no_aws)
    assert cloud.main(["security-group", "--region", REGION, "--cidr", "198.51.100.0/24", "--cidr", cidr]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and f"{cidr}: --cidr: " in captured.err


@pytest.mark.parametrize("cidr, prefix", [("203.0.113.7/32", 32), ("172.16.0.0/16", 16), ("2001:db8:1::/48", 48)])
def test_your_own_ranges_are_accepted(cidr, prefix):
    network = cloud.parse_cidr(cidr)
    assert network.prefixlen == prefix and network == ipaddress.ip_network(cidr)
