"""Shared fixtures: a `mooncake master` on free loopback ports, the test helpers on sys.path."""

import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# One BLAS thread: the tiny model's results must not depend on thread scheduling.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mooncake_binary():
    from mooncake import cli

    return cli.binary()


class Master:
    def __init__(self, *flags):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [mooncake_binary(), "master", f"--rpc_port={self.port}", "--rpc_address=127.0.0.1",
             "--metrics_port=0", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("master rpc"):
                break
            if self.proc.poll() is not None:
                raise RuntimeError("mooncake master exited")
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def master():
    m = Master("--default_kv_lease_ttl=2000", "--ramp_up_ms=0")
    yield m
    m.stop()
