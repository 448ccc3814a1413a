"""Placeholder until the metrics endpoint lands."""


def start(agent, addr: str, port: int) -> None:
    pass
