"""CurveZMQ keys as a user sets them up for hosts on other machines (docs/hosts.md), for the tests and benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path

from protocol.curve import write_keypair


def ironhouse(keys: Path, *hosts: str) -> tuple[Path, Path, dict[str, Path], Path]:
    """The learner's key pair and each host's, every host's public key in the learner's allowed directory:
    (learner public, learner secret, {host: its secret key file}, allowed directory)."""
    learner_public, learner_secret = write_keypair(keys, "learner")
    clients = keys / "clients"
    clients.mkdir()
    secrets = {}
    for host in hosts:
        public, secrets[host] = write_keypair(keys, host)
        shutil.copy(public, clients / public.name)
    return learner_public, learner_secret, secrets, clients
