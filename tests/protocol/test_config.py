"""Config validation: one clear line naming the key path, never a traceback."""

import pytest

from protocol.config import ConfigError, load_config, parse_value

pytestmark = pytest.mark.timeout(30)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_validate():
    for name in ("configs/default.yaml", "configs/pendulum.yaml"):
        cfg = load_config(name)
        assert cfg.workers.count == 2
    cfg = load_config("configs/default.yaml")
    assert cfg.env.id == "racetrack-v1" and cfg.env.frame_stack == 4 and cfg.learner.device == "auto"


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "learner:\n  batch_sise: 3\n"))
    assert "learner.batch_sise: unknown key" in str(err.value)


def test_wrong_type_names_its_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "workers:\n  count: many\n"))
    assert "workers.count" in str(err.value) and "many" in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config(write(tmp_path, "a: 1\n  b: [\n"))


def test_overrides_apply_with_types():
    cfg = load_config("configs/pendulum.yaml", [("learner.actor_lr", parse_value("1e-4")),
                                                 ("workers.count", parse_value("3")),
                                                 ("run.debug", parse_value("true"))])
    assert cfg.learner.actor_lr == 1e-4 and cfg.workers.count == 3 and cfg.run.debug is True
    with pytest.raises(ConfigError, match="learner.nope: unknown key"):
        load_config(None, [("learner.nope", 1)])


def test_layered_deadlines_are_checked():
    with pytest.raises(ConfigError, match="heartbeat_deadline_s must exceed"):
        load_config(None, [("supervisor.heartbeat_deadline_s", 0.1)])


def test_carla_configs_extend_their_base_and_stage_the_validation():
    stages = {name: load_config(f"configs/{name}.yaml") for name in ("carla", "stage1", "stage2", "stage3")}
    assert all(c.env.backend == "carla" and c.simulators.mode == "container" for c in stages.values())
    assert (stages["stage1"].env.carla.map, stages["stage1"].env.carla.npcs, stages["stage1"].run.max_timesteps) == \
        ("Town01", 5, 1000)
    assert (stages["stage2"].env.carla.npcs, stages["stage2"].run.max_timesteps) == (20, 5000)
    assert (stages["stage3"].env.carla.npcs, stages["stage3"].run.max_timesteps, stages["stage3"].workers.eval_freq) \
        == (20, 50000, 10000)
    assert stages["stage1"].learner.batch_size == stages["carla"].learner.batch_size, "the rest comes from the base"


def test_extends_cycles_and_missing_bases_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "c.yaml")


def test_a_scenario_sets_map_npcs_and_route_and_an_unknown_one_is_named():
    scenarios = [{"name": "quiet", "map": "Town02", "npcs": 3}, {"name": "busy", "npcs": 40, "route_length_m": 500}]
    cfg = load_config(None, [("env.carla.scenarios", scenarios), ("env.carla.scenario", "busy")])
    assert (cfg.env.carla.map, cfg.env.carla.npcs, cfg.env.carla.route_length_m) == ("Town01", 40, 500)
    cfg = load_config(None, [("env.carla.scenarios", scenarios), ("env.carla.scenario", 0)])
    assert (cfg.env.carla.map, cfg.env.carla.npcs) == ("Town02", 3)
    with pytest.raises(ConfigError, match="'rush' is not one of"):
        load_config(None, [("env.carla.scenarios", scenarios), ("env.carla.scenario", "rush")])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(None, [("env.carla.scenarios", scenarios), ("env.carla.scenario", 5)])


def test_carla_deadlines_are_layered_and_external_servers_counted():
    with pytest.raises(ConfigError, match="progress_deadline_s .* must exceed env.carla.tick_timeout_s"):
        load_config(None, [("env.backend", "carla"), ("supervisor.progress_deadline_s", 6.0)])
    with pytest.raises(ConfigError, match="heartbeat_deadline_s .* must exceed env.carla.client_timeout_s"):
        load_config(None, [("env.backend", "carla"), ("supervisor.progress_deadline_s", 20)])
    with pytest.raises(ConfigError, match="lists 1 servers for 2 workers"):
        load_config(None, [("env.backend", "carla"), ("simulators.mode", "external"),
                           ("simulators.external", ["127.0.0.1:2000"]), ("supervisor.progress_deadline_s", 20),
                           ("supervisor.heartbeat_deadline_s", 30)])
    with pytest.raises(ConfigError, match="unknown placeholder"):
        load_config(None, [("simulators.command", "./CarlaUE4.sh -carla-rpc-port={rpc}")])
    carla = [("env.backend", "carla"), ("supervisor.progress_deadline_s", 20), ("supervisor.heartbeat_deadline_s", 30)]
    with pytest.raises(ConfigError, match="slot 1 streaming port 65536 is past 65535"):
        load_config(None, carla + [("simulators.base_port", 65000), ("simulators.port_stride", 535),
                                   ("workers.count", 2)])
    with pytest.raises(ConfigError, match="slot 0 traffic manager port 2001 is also slot 0 streaming's"):
        load_config(None, carla + [("simulators.tm_base_port", 2001)])
    with pytest.raises(ConfigError, match="is not host:port"):
        load_config(None, [("simulators.external", ["localhost"])])


def test_list_items_can_be_overridden_by_index():
    cfg = load_config("configs/carla.yaml", [("env.carla.scenarios.0.npcs", 9), ("env.carla.scenario", 0)])
    assert cfg.env.carla.npcs == 9
    with pytest.raises(ConfigError, match="not an index"):
        load_config("configs/carla.yaml", [("env.carla.scenarios.7.npcs", 9)])


def test_scenario_and_npcs_flags_the_npcs_flag_wins():
    from supervisor.cli import build_parser
    from supervisor.preflight import config_from

    def cfg(*argv):
        return config_from(build_parser().parse_args(["up", "--config", "configs/carla.yaml", *argv]))

    assert cfg("--scenario", "town01_minimal_traffic").env.carla.npcs == 5
    assert cfg("--scenario", "2").env.carla.map == "Town02"
    assert cfg("--scenario", "town01_minimal_traffic", "--npcs", "11").env.carla.npcs == 11
    assert cfg("--npcs", "3").env.carla.npcs == 3
