"""The one AWS resource cluster.yaml needs made before `ray up`: its security group.

Left to itself, `ray up` creates a group for every node type whose node_config has no SecurityGroupIds,
and into a new (empty) group it writes its built-in SSH rule from 0.0.0.0/0 next to yours
(ray.autoscaler._private.aws.config: _configure_security_group, _create_default_ssh_inbound_rules).
cluster.yaml therefore names a group in every node type, and this command makes that group: SSH
(tcp 22) from the ranges given, all traffic between members of the group (Ray's GCS, object manager,
workers), nothing else. Re-running it reuses the group and sets its inbound rules to exactly these
again, revoking any other (say, the 0.0.0.0/0 rule of a group Ray made earlier), so it also fixes a
group and follows a changed address.

    python -m altgrad.cloud security-group --region us-west-2 --cidr 203.0.113.7/32   # prints the group id
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from altgrad.config import ConfigError

GROUP_NAME = "altgrad-ray"
# What cluster.yaml ships instead of a group id: no group has this id, so `ray up` stops at once
# ("Failed to detect a security group ...") rather than making an open one.
PLACEHOLDER_GROUP_ID = "sg-RUN-ALTGRAD-CLOUD-FIRST"
# The widest range accepted per address family: an organisation's, never a large share of the internet.
WIDEST_PREFIX = {4: 16, 6: 48}
EXIT_BAD_INPUT = 2
EXIT_AWS_ERROR = 1

# One inbound grant: (protocol, from_port, to_port, source list key, source). AWS groups grants into
# permissions with lists of sources; comparing single grants makes "exactly these rules" a set difference.
_SOURCE_FIELD = {"IpRanges": "CidrIp", "Ipv6Ranges": "CidrIpv6", "UserIdGroupPairs": "GroupId",
                 "PrefixListIds": "PrefixListId"}
_DESCRIPTION = {"UserIdGroupPairs": "the cluster's own nodes: Ray's ports",
                "IpRanges": "SSH for ray up / attach / exec / dashboard",
                "Ipv6Ranges": "SSH for ray up / attach / exec / dashboard"}


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A range of yours: written with its prefix, no host bits, and never the whole (or most of the) internet."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise ConfigError(text, "--cidr", f"not a CIDR range ({error})") from None
    if "/" not in text:
        raise ConfigError(text, "--cidr", f"no prefix length; write {network} for this one address")
    widest = WIDEST_PREFIX[network.version]
    if network.prefixlen < widest:
        raise ConfigError(text, "--cidr", f"opens SSH to {network.num_addresses:.3g} addresses; "
                                         f"give your own range, /{widest} or narrower")
    return network


def _grants(permissions: list[dict]) -> set[tuple]:
    grants = set()
    for permission in permissions:
        protocol = permission["IpProtocol"]
        ports = (None, None) if protocol == "-1" else (permission.get("FromPort"), permission.get("ToPort"))
        for key, field in _SOURCE_FIELD.items():
            grants.update((protocol, *ports, key, source[field]) for source in permission.get(key, []))
    return grants


def _permission(grant: tuple, described: bool = False) -> dict:
    protocol, from_port, to_port, key, source = grant
    entry = {_SOURCE_FIELD[key]: source}
    if described:
        entry["Description"] = _DESCRIPTION[key]
    permission = {"IpProtocol": protocol, key: [entry]}
    if from_port is not None:
        permission.update(FromPort=from_port, ToPort=to_port)
    return permission


def wanted_grants(group_id: str, cidrs) -> set[tuple]:
    """All traffic from the group itself, SSH from each range."""
    ssh = {("tcp", 22, 22, "IpRanges" if cidr.version == 4 else "Ipv6Ranges", str(cidr)) for cidr in cidrs}
    return {("-1", None, None, "UserIdGroupPairs", group_id)} | ssh


def default_vpc(ec2) -> str:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise ConfigError(ec2.meta.region_name, "--vpc", "the region has no default VPC; pass the VPC to use")
    return vpcs[0]["VpcId"]


def ensure_security_group(ec2, vpc_id: str, cidrs, name: str = GROUP_NAME) -> tuple[str, list[str]]:
    """The group's id, and what changed: created, and each rule added or revoked (nothing on a re-run)."""
    found = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                                  {"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    changes = []
    if found:
        group_id, current = found[0]["GroupId"], _grants(found[0]["IpPermissions"])
    else:
        group_id = ec2.create_security_group(
            GroupName=name, VpcId=vpc_id, Description="altgrad ray cluster: SSH from chosen ranges only",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": [{"Key": "altgrad", "Value": "ray"}]}],
        )["GroupId"]
        current = set()
        changes.append(f"created {name} in {vpc_id}")
    wanted = wanted_grants(group_id, cidrs)
    extra, missing = sorted(current - wanted, key=str), sorted(wanted - current, key=str)
    if extra:
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[_permission(g) for g in extra])
    if missing:
        ec2.authorize_security_group_ingress(GroupId=group_id,
                                             IpPermissions=[_permission(g, described=True) for g in missing])
    changes += [f"revoked {_describe(g)}" for g in extra] + [f"allowed {_describe(g)}" for g in missing]
    return group_id, changes


def _describe(grant: tuple) -> str:
    protocol, from_port, _, _, source = grant
    what = "all traffic" if protocol == "-1" else f"{protocol} {from_port}"
    return f"{what} from {source}"


def _cmd_security_group(args) -> int:
    import boto3
    import botocore.exceptions

    cidrs = [parse_cidr(text) for text in args.cidr]
    try:
        ec2 = boto3.client("ec2", region_name=args.region)
        vpc_id = args.vpc or default_vpc(ec2)
        group_id, changes = ensure_security_group(ec2, vpc_id, cidrs, args.name)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        print(f"altgrad.cloud security-group: AWS error: {error}", file=sys.stderr)
        return EXIT_AWS_ERROR
    for change in changes or ["unchanged"]:
        print(f"{args.name} {group_id}: {change}", file=sys.stderr)
    print(group_id)  # alone on stdout, for SG=$(python -m altgrad.cloud security-group ...)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m altgrad.cloud", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    group = verbs.add_parser("security-group", help="make (or fix) cluster.yaml's security group; print its id")
    group.add_argument("--region", required=True, help="provider.region of cluster.yaml, e.g. us-west-2")
    group.add_argument("--cidr", required=True, action="append",
                       help="a range SSH may come from, e.g. 203.0.113.7/32 (your address); repeatable")
    group.add_argument("--vpc", default=None, help="VPC id (default: the region's default VPC)")
    group.add_argument("--name", default=GROUP_NAME, help=f"group name (default {GROUP_NAME})")
    group.set_defaults(run=_cmd_security_group)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"altgrad.cloud {args.verb}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
