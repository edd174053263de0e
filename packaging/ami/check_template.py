#!/usr/bin/env python3
"""Structural check of the AMI template (packaging/ami/*.pkr.hcl), parsed with python-hcl2.

Stands in for the part of `packer validate` that the machine's packer cannot do: Debian's
packer (1.6.6) predates the amazon builder's `metadata_options` and `imds_support`, and a
current packer with the amazon plugin cannot be installed here (docs/packaging.md). Checks
what the image's security depends on: IMDSv2 required with a hop limit of 1 on the build
instance, `imds_support = "v2.0"` on the AMI, the .deb uploaded and provision.sh run as
root with it, the plugin pinned to a release that knows these settings, and every `var.X`
declared. Prints one line per check; exits 1 naming the first failure.
Usage: check_template.py DIR
"""
import re
import sys
from pathlib import Path

import hcl2


def unq(v):
    """python-hcl2 keeps the quotes of string literals; drop them."""
    if isinstance(v, str) and len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return v[1:-1]
    return v


def check(ok, what):
    if not ok:
        print(f"FAIL {what}")
        sys.exit(1)
    print(f"ok   {what}")


def main():
    d = Path(sys.argv[1])
    template = hcl2.load(open(d / "airlock-runner.pkr.hcl"))
    plugins = hcl2.load(open(d / "plugins.pkr.hcl"))

    sources = template.get("source", [])
    check(len(sources) == 1, "one source block")
    ebs = {unq(k): v for k, v in sources[0].items()}
    check(list(ebs) == ["amazon-ebs"], "the source is amazon-ebs")
    src = next(iter(ebs["amazon-ebs"].values()))

    meta = src.get("metadata_options", [])
    check(len(meta) == 1, "one metadata_options block on the build instance")
    m = meta[0]
    check(unq(m.get("http_endpoint")) == "enabled", "metadata_options.http_endpoint = enabled")
    check(unq(m.get("http_tokens")) == "required", "metadata_options.http_tokens = required (IMDSv2 only)")
    check(m.get("http_put_response_hop_limit") == 1, "metadata_options.http_put_response_hop_limit = 1")
    check(unq(src.get("imds_support")) == "v2.0", 'imds_support = "v2.0" on the AMI')

    builds = template.get("build", [])
    check(len(builds) == 1, "one build block")
    b = builds[0]
    check([unq(s) for s in b.get("sources", [])] == ["source.amazon-ebs.runner"], "the build uses source.amazon-ebs.runner")
    provs = b.get("provisioner", [])
    kinds = [unq(next(iter(p))) for p in provs]
    check(kinds == ["file", "shell"], "provisioners: file, then shell")
    upload = next(iter(provs[0].values()))
    check(upload.get("source") == "${var.airlock_deb}", "the file provisioner uploads var.airlock_deb")
    deb_dest = unq(upload.get("destination"))
    shell = next(iter(provs[1].values()))
    check(unq(shell.get("script")) == "${path.root}/provision.sh", "the shell provisioner runs provision.sh")
    check((d / "provision.sh").is_file(), "provision.sh is beside the template")
    env = [unq(e) for e in shell.get("environment_vars", [])]
    check(f"AIRLOCK_DEB={deb_dest}" in env, f"provision.sh gets AIRLOCK_DEB={deb_dest}")
    check(unq(shell.get("execute_command", "")).startswith("sudo "), "provision.sh runs as root (sudo)")

    declared = {unq(next(iter(v))) for v in template.get("variable", [])}
    text = (d / "airlock-runner.pkr.hcl").read_text()
    used = set(re.findall(r"\bvar\.([A-Za-z0-9_]+)", text))
    check(used <= declared, f"every var.X is declared (undeclared: {sorted(used - declared)})")

    req = plugins["packer"][0]["required_plugins"][0]["amazon"]
    check(unq(req["source"]) == "github.com/hashicorp/amazon", "the amazon plugin is required")
    ver = re.fullmatch(r">=\s*(\d+)\.(\d+)\.(\d+)", unq(req["version"]))
    check(ver is not None and tuple(map(int, ver.groups())) >= (1, 1, 0),
          "the amazon plugin is pinned to >= 1.1.0 (the first with imds_support)")


if __name__ == "__main__":
    main()
