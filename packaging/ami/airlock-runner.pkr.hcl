# An AMI with airlock and a GitHub Actions runner (docs/packaging.md, "Baking an AMI").
#   make package
#   packer init packaging/ami
#   packer build -var airlock_deb=target/packages/airlock_0.1.0-1_amd64.deb \
#     -var runner_version=2.329.0 -var runner_sha256=<sha256 of that release's linux-x64 tarball> \
#     packaging/ami
# The runner is installed but not registered: an instance registers it at boot (user data,
# `config.sh --ephemeral` or `run.sh --jitconfig`), after airlockd has started.

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.large"
}

variable "airlock_deb" {
  type        = string
  description = "The airlock .deb to install (make package: target/packages/airlock_<version>-1_amd64.deb)."
}

variable "runner_version" {
  type        = string
  description = "GitHub Actions runner release, e.g. 2.329.0."
}

variable "runner_sha256" {
  type        = string
  description = "SHA-256 of actions-runner-linux-x64-<runner_version>.tar.gz, from the release notes."
}

variable "source_ami_name" {
  type    = string
  default = "debian-13-amd64-*"
}

variable "source_ami_owner" {
  type    = string
  default = "136693071363" # Debian's AWS account
}

locals {
  stamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "runner" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "airlock-github-runner-${local.stamp}"

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = [var.source_ami_owner]
    most_recent = true
  }

  # The build instance: IMDSv2 only (no token-less IMDSv1 requests), and a hop limit of 1 so
  # that nothing one network hop away from the host (a container, a job's namespace) gets a
  # token from the real metadata service.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  # Instances launched from the AMI default to IMDSv2 only as well.
  imds_support = "v2.0"

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 40
    volume_type           = "gp3"
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    Name    = "airlock-github-runner"
    Runner  = var.runner_version
    BuiltBy = "packer"
  }
}

build {
  sources = ["source.amazon-ebs.runner"]

  provisioner "file" {
    source      = var.airlock_deb
    destination = "/tmp/airlock.deb"
  }

  provisioner "shell" {
    script = "${path.root}/provision.sh"
    environment_vars = [
      "AIRLOCK_DEB=/tmp/airlock.deb",
      "RUNNER_VERSION=${var.runner_version}",
      "RUNNER_SHA256=${var.runner_sha256}",
    ]
    execute_command = "sudo -E sh -c '{{ .Vars }} bash {{ .Path }}'"
  }
}
