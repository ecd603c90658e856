# The batchly worker AMI: Amazon Linux 2023 with batchly-agent installed from
# its .rpm and enabled, for packaging/cloudformation/batchly-worker.yaml.
#
#   packer init ami/
#   packer build -var rpm_path=target/generate-rpm/batchly-agent-0.1.0-1.x86_64.rpm ami/
#
# Written for current Packer with the amazon plugin. Debian's Packer 1.6.6
# has the amazon-ebs builder built in, but an older one: it knows neither
# required_plugins, metadata_options nor imds_support. Those lines sit
# between "packer>=1.7" markers, and scripts/check-deploy validates the rest
# with 1.6.6 (see docs/operating-deploy.md).

packer {
  required_version = ">= 1.6.6"
  # packer>=1.7 begin
  required_plugins {
    amazon = {
      version = "= 1.8.2"
      source  = "github.com/hashicorp/amazon"
    }
  }
  # packer>=1.7 end
}

variable "region" {
  type        = string
  default     = "eu-west-1"
  description = "Region to build in and register the AMI in."
}

variable "rpm_path" {
  type        = string
  description = "The batchly-agent .rpm to install (cargo generate-rpm writes it under target/generate-rpm/)."
}

variable "agent_version" {
  type        = string
  default     = "0.1.0"
  description = "The agent version in the .rpm; it goes into the AMI's name and tags."
}

variable "instance_type" {
  type        = string
  default     = "m7i.large"
  description = "Instance type of the build instance (x86_64)."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet of the build instance; empty uses the default VPC."
}

variable "ssh_source_cidrs" {
  type        = list(string)
  default     = ["0.0.0.0/0"]
  description = "Who may reach the build instance's temporary SSH port; narrow it to your build host."
}

variable "kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key for the AMI's encrypted snapshot; empty uses the account's EBS default key."
}

variable "verification_keys" {
  type        = string
  default     = ""
  description = "Contents of /etc/batchly/keys.toml to bake in (public Ed25519 entries); empty leaves it to user data."
}

locals {
  stamp = regex_replace(timestamp(), "[- TZ:]", "")
  tags = {
    "platform:managed-by" = "batchly"
    "batchly:agent"       = var.agent_version
    Name                  = "batchly-worker-${var.agent_version}"
  }
}

source "amazon-ebs" "al2023" {
  region          = var.region
  instance_type   = var.instance_type
  subnet_id       = var.subnet_id
  ami_name        = "batchly-worker-${var.agent_version}-${local.stamp}"
  ami_description = "Amazon Linux 2023 with batchly-agent ${var.agent_version}"

  source_ami_filter {
    filters = {
      name                  = "al2023-ami-2023.*-x86_64"
      architecture          = "x86_64"
      "virtualization-type" = "hvm"
      "root-device-type"    = "ebs"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  ssh_username                          = "ec2-user"
  ssh_clear_authorized_keys             = true
  temporary_security_group_source_cidrs = var.ssh_source_cidrs

  # packer>=1.7 begin
  # The build instance answers IMDSv2 only, one hop away.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  # Instances launched from the AMI default to IMDSv2 only as well (their
  # hop limit then defaults to 2; the launch template sets 1).
  imds_support = "v2.0"
  # packer>=1.7 end

  encrypt_boot = true
  kms_key_id   = var.kms_key_id
  launch_block_device_mappings {
    device_name = "/dev/xvda"
    volume_type = "gp3"
    volume_size = 8
    # gp3's baseline, stated: Packer 1.6.6 refuses gp3 without a throughput.
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    kms_key_id            = var.kms_key_id
    delete_on_termination = true
  }

  tags            = local.tags
  snapshot_tags   = local.tags
  run_tags        = local.tags
  run_volume_tags = local.tags
}

build {
  sources = ["source.amazon-ebs.al2023"]

  provisioner "file" {
    source      = var.rpm_path
    destination = "/tmp/batchly-agent.rpm"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "BATCHLY_RPM=/tmp/batchly-agent.rpm",
      "BATCHLY_VERIFICATION_KEYS_B64=${base64encode(var.verification_keys)}",
    ]
    scripts = [
      "${path.root}/scripts/install-agent.sh",
      "${path.root}/scripts/enable-agent.sh",
      "${path.root}/scripts/clean-image.sh",
    ]
  }
}
