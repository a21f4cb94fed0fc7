"""`supervisor keys` and `up`'s checks of the wire across hosts (keys, learner.listen's ports), in-process: no
process is started here."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from protocol.config import load_config
from protocol.curve import load_public, load_secret, write_keypair
from supervisor import cli
from supervisor.plan import build_plan
from supervisor.preflight import wire_problem
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)
PENDULUM = ROOT / "configs" / "pendulum.yaml"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_are_written_0600_never_over_an_existing_pair_and_read_back(tmp_path, capsys):
    assert cli.main(["keys", "learner", "--dir", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    public_path, secret_path = tmp_path / "keys" / "learner.key", tmp_path / "keys" / "learner.key_secret"
    assert str(public_path) in out and str(secret_path) in out
    assert mode(public_path) == mode(secret_path) == 0o600 and mode(tmp_path / "keys") & 0o077 == 0
    public, secret = load_secret(secret_path, "learner.curve_key")
    assert load_public(public_path, "x") == public and len(public) == len(secret) == 40
    assert public.decode() not in out and secret.decode() not in out, "keys are not printed"
    before = secret_path.read_bytes()
    assert cli.main(["keys", "learner", "--dir", str(tmp_path / "keys")]) == cli.EXIT_USAGE
    assert "never overwritten" in capsys.readouterr().err and secret_path.read_bytes() == before
    with pytest.raises(ValueError, match="plain file name"):
        write_keypair(tmp_path, "../escape")
    # zmq's own certificate reader takes them too
    import zmq.auth

    assert zmq.auth.load_certificate(secret_path) == (public, secret)


def test_up_names_a_missing_key_an_empty_allow_list_and_a_taken_port_before_writing_anything(tmp_path):
    write_keypair(tmp_path, "learner")
    (tmp_path / "clients").mkdir()

    def problem(**keys):
        cfg = load_config(PENDULUM, list(keys.items()))
        return wire_problem(cfg, build_plan(cfg))

    secret = str(tmp_path / "learner.key_secret")
    assert "holds no public key" in problem(**{"learner.listen": "tcp://127.0.0.1:7000", "learner.curve_key": secret,
                                               "learner.curve_clients": str(tmp_path / "clients")})
    assert "does not exist" in problem(**{"run.role": "workers", "workers.learner": "tcp://127.0.0.1:7000",
                                          "workers.curve_key": str(tmp_path / "host.key_secret"),
                                          "workers.learner_key": str(tmp_path / "learner.key")})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = problem(**{"learner.listen": f"tcp://127.0.0.1:{port - 1}"})
        assert said == (f"learner.listen's port {port} on 127.0.0.1 is in use; free it, or choose another with --set "
                        "learner.listen=tcp://127.0.0.1:N")
    write_keypair(tmp_path / "clients", "host-a")
    for _ in range(20):  # a free pair of ports (another process may take one meanwhile: then try the next)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        said = problem(**{"learner.listen": f"tcp://127.0.0.1:{free}", "learner.curve_key": secret,
                          "learner.curve_clients": str(tmp_path / "clients")})
        if said is None or "in use" not in said:
            break
    assert said is None


def test_status_shows_the_connections_the_learner_refused():
    from supervisor.display import status_notes
    from tests.supervisor.test_metrics import payload

    status = payload()
    assert next(p for p in status["processes"] if p["name"] == "learner")["refused"] == 7
    assert "learner refused 7 connection(s) from hosts whose key it does not allow" in status_notes(status)
    assert not [line for line in status_notes(status) if "worker-0 refused" in line]


def test_status_keeps_only_well_formed_hosts():
    from supervisor.control import sending_hosts

    good = {"host": "host-b", "slots": 2, "steps": 10, "last_seen_s": 0.5}
    bad = [dict(good, steps=float("inf")), dict(good, last_seen_s=float("nan")), dict(good, slots=-1),
           dict(good, host="\x1b[2Jhost"), dict(good, host="x" * 100), dict(good, steps=True)]
    assert sending_hosts([good, *bad]) == [good]


def test_a_workers_only_host_is_not_held_to_the_learners_keys_and_ports():
    """One config for every host: the learner's key paths and port mean nothing on a host that runs no learner."""
    cfg = load_config(PENDULUM, [("learner.listen", "tcp://0.0.0.0:7000"),
                                 ("learner.curve_key", "/nonexistent/learner.key_secret"),
                                 ("learner.curve_clients", "/nonexistent/clients"), ("run.role", "workers"),
                                 ("workers.learner", "tcp://127.0.0.1:7000")])
    assert wire_problem(cfg, build_plan(cfg)) is None
    from protocol.config import ConfigError

    with pytest.raises(ConfigError, match="is another learner than this run's own .*--role workers"):
        load_config(PENDULUM, [("workers.learner", "tcp://127.0.0.1:7000")])
    assert load_config(PENDULUM, [("workers.learner", "tcp://127.0.0.1:7000"),
                                  ("learner.listen", "tcp://127.0.0.1:7000")]).run.role == "all"
