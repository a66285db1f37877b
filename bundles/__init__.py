"""Files -> desired state: load .dab/.json/.yaml bundles, validate them strictly, hash what changes a container."""

from bundles.desired import DesiredState, ServiceTarget, StackBundle, desired_networks, service_targets
from bundles.errors import BundleError, InvalidBundles
from bundles.load import load_bundle_file, load_directory, load_paths, parse_bundle

__all__ = [
    "BundleError",
    "DesiredState",
    "InvalidBundles",
    "ServiceTarget",
    "StackBundle",
    "desired_networks",
    "load_bundle_file",
    "load_directory",
    "load_paths",
    "parse_bundle",
    "service_targets",
]
