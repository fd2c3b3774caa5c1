"""The ``serve`` fixture: reward-server applications on free ports of 127.0.0.1, closed after the test."""
import pytest


@pytest.fixture
def serve():
    from benchmarks.bench_reward_server import Server

    servers = []

    def start(app):
        servers.append(Server(app))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
