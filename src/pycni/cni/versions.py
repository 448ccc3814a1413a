"""CNI spec versions: which ones pycni speaks and which one a config asks for."""

from __future__ import annotations

from .errors import INCOMPATIBLE_VERSION, CniError, config_error

SUPPORTED = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED[-1]
# A config without cniVersion predates the field: the spec reads it as the oldest format.
IMPLICIT = "0.2.0"


def parse(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(version)
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    return parse(version) >= parse(minimum)


def check_supported(version: str) -> str:
    if version not in SUPPORTED:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"CNI version {version} is not supported",
            f"pycni supports {', '.join(SUPPORTED)}",
        )
    return version


def from_config(conf: dict) -> str:
    """The version to answer in: `cniVersion`, else the highest supported of `cniVersions`."""
    if "cniVersion" in conf:
        version = conf["cniVersion"]
        if not isinstance(version, str):
            raise config_error("cniVersion", 'must be a string such as "1.0.0"')
        return check_supported(version)
    if "cniVersions" in conf:
        versions = conf["cniVersions"]
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise config_error("cniVersions", "must be a list of version strings")
        usable = [v for v in versions if v in SUPPORTED]
        if not usable:
            raise CniError(
                INCOMPATIBLE_VERSION,
                f"none of the CNI versions {versions} is supported",
                f"pycni supports {', '.join(SUPPORTED)}",
            )
        return max(usable, key=parse)
    return IMPLICIT


def require(version: str, minimum: str, command: str) -> None:
    """CHECK needs 0.4.0, STATUS and GC 1.1.0: older configs must not get them."""
    if not at_least(version, minimum):
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {command} (needs {minimum} or later)",
        )
