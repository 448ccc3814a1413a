"""The CNI protocol: environment, network config, versions, results and errors."""

# A config with a chained prevResult is a few KB; anything past this is refused (code 6).
MAX_CONFIG_BYTES = 4 << 20
