# Packer and the amazon plugin this template needs (`packer init packaging/ami` installs it).
# Kept in a file of its own so that the template itself also parses with older Packer
# releases (the packaging test checks its syntax with Debian's packer).
packer {
  required_version = ">= 1.9.0"
  required_plugins {
    amazon = {
      # imds_support needs 1.1.0 or later.
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.1"
    }
  }
}
