"""The host agent's choice of key and name: a host is who its key says it is, wherever Ray placed it."""

from fleet.agent import HOST_KEY_ENV, host_identity
from supervisor.display import status_notes


def test_a_node_s_own_key_wins_and_names_its_workers_with_the_heads_name_for_the_host():
    assert host_identity("/etc/rlstack/host.key_secret", "host-3", environ={}) == \
        ("/etc/rlstack/host.key_secret", "host.host-3")
    assert host_identity("/etc/rlstack/host.key_secret", "host-3",
                         environ={HOST_KEY_ENV: "/etc/rlstack/gpu-b.key_secret"}) == \
        ("/etc/rlstack/gpu-b.key_secret", "gpu-b.host-3")
    assert host_identity(None, "host-3", environ={}) == (None, "host-3"), "no keys: the head's name"


def test_status_shows_the_name_a_host_goes_by_where_it_differs():
    row = {"name": "host-0", "role": "host", "state": "running", "node": "abcd", "identity": "gpu-b.host-0",
           "children": [{"name": "worker-0", "state": "running", "env_steps": 5, "restarts": 0, "weights": 7}]}
    text = "\n".join(status_notes({"processes": [row]}))
    assert "host-0 (node abcd, as gpu-b.host-0): worker-0 running 5 steps weights v7" in text
