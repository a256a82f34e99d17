"""`fcrun serve`'s TOML configuration: defaults, overrides, and errors that name file and key."""

from __future__ import annotations

import pytest

from fcrun.errors import NotFound, SpecError
from fcrun.serve.config import ServeConfig, load_config, parse_address




def test_no_file_gives_the_defaults(paths):
    config = load_config(None, paths)
    assert config.listen == "0.0.0.0:8080"
    assert config.admin_socket == f"{paths.run_root}/admin.sock"
    assert config.admin_listen is None and config.admin_token is None
    assert (config.hold_timeout_s, config.drain_timeout_s) == (30.0, 10.0)
    assert config.proxy.max_header_bytes == 32768
    assert (config.proxy.header_timeout_s, config.proxy.keepalive_timeout_s) == (10.0, 60.0)
    assert config.paths == paths
    assert config.runtime.bridge == "fcrun0" and config.runtime.subnet == "10.88.0.0/16"
    assert config.defaults.max_instances == 1 and config.defaults.idle_timeout_s == 60.0
    assert config.docroot_roots == ("/srv", "/var/www")


def test_roots_come_from_the_environment_when_not_given(monkeypatch, tmp_path):
    monkeypatch.setenv("FCRUN_ROOT", str(tmp_path / "r"))
    monkeypatch.setenv("FCRUN_RUN", str(tmp_path / "s"))
    config = load_config()
    assert config.runtime.data_root == str(tmp_path / "r")
    assert config.admin_socket == str(tmp_path / "s" / "admin.sock")


def test_a_file_overrides_what_it_names(write, paths, tmp_path):
    config = load_config(write(f"""
        listen = "127.0.0.1:9000"
        admin_listen = "127.0.0.1:0"
        admin_token = "s3cret"
        hold_timeout_s = 5
        metrics_interval_s = 2.5

        [proxy]
        max_header_bytes = 16384

        [runtime]
        data_root = "{tmp_path}/elsewhere"
        bridge = "fc1"

        [defaults]
        cpu = 0.3
        memory_bytes = 268435456
        max_instances = 3
        max_lifetime_s = 3600
    """), paths)
    assert config.listen == "127.0.0.1:9000"
    assert (config.admin_listen, config.admin_token) == ("127.0.0.1:0", "s3cret")
    assert config.hold_timeout_s == 5.0 and config.metrics_interval_s == 2.5
    assert config.drain_timeout_s == 10.0  # not named: default
    assert config.proxy.max_header_bytes == 16384 and config.proxy.keepalive_timeout_s == 60.0
    assert config.runtime.data_root == f"{tmp_path}/elsewhere"
    assert config.runtime.run_root == paths.run_root
    assert config.runtime.bridge == "fc1"
    assert (config.defaults.cpu, config.defaults.memory_bytes, config.defaults.max_instances) == (0.3, 256 << 20, 3)
    assert config.defaults.max_lifetime_s == 3600


@pytest.mark.parametrize("text,where,words", [
    ('lisen = "0.0.0.0:80"', "$.lisen", "unknown key `lisen`"),
    ("[proxy]\nmax_header_byte = 100", "$.proxy.max_header_byte", "unknown key"),
    ("[defaults]\nmemory = '512M'", "$.defaults.memory", "unknown key"),
    ('hold_timeout_s = "30"', "$.hold_timeout_s", "Expected `float`, got `str`"),
    ('[proxy]\nmax_header_bytes = "32K"', "$.proxy.max_header_bytes", "Expected `int`"),
    ("proxy = 3", "$.proxy", "Expected `object`"),
    ("hold_timeout_s = 0", "$.hold_timeout_s", "positive"),
    ("[proxy]\nmax_header_bytes = 100", "$.proxy.max_header_bytes", "at least 1024"),
    ("[proxy]\nheader_timeout_s = -1", "$.proxy.header_timeout_s", "positive"),
    ('listen = "8080"', "$.listen", "HOST:PORT"),
    ('admin_listen = "127.0.0.1:8081"', "$.admin_token", "admin_token is required"),
    ('admin_listen = "127.0.0.1:8081"\nadmin_token = " s3cret"', "$.admin_token", "without spaces"),  # unsendable
    ('admin_listen = "127.0.0.1:8081"\nadmin_token = "s\u00e9cret"', "$.admin_token", "printable ASCII"),
    ('listen = "127.0.0.1:8080"\nmetrics_listen = "127.0.0.1:9090"\nmetrics_token = "a\\tb"', "$.metrics_token",
     "printable ASCII"),
    ('listen = "127.0.0.1:\u00b2"', "$.listen", "HOST:PORT"),  # "²": isdigit() took it, int() did not
    ('admin_socket = "admin.sock"', "$.admin_socket", "absolute"),
    ('[runtime]\nrun_root = "run"', "$.runtime.run_root", "absolute"),
    ("[defaults]\nmin_instances = 2", "$.defaults.min_instances", "above max_instances"),
    ("[defaults]\nmemory_bytes = 1024", "$.defaults.memory_bytes", "memory_bytes must be at least 4194304"),
    ("[defaults]\nidle_timeout_s = inf", "$.defaults.idle_timeout_s", "idle_timeout_s must be a finite number"),
    ("[defaults]\nport = 0", "$.defaults.port", "unknown key"),  # an app's own, no default
    ("[forkserver]\npool_size = 2000", "$.forkserver.pool_size", "pool_size must be at most 1024"),
    ("[forkserver]\npool_sizes = {apache-php = -1}", "$.forkserver.pool_sizes[...]",
     "each value of pool_sizes must be at least 0"),
    ("[forkserver]\npool_cpu = 0.001", "$.forkserver.pool_cpu", "pool_cpu must be at least 0.01"),
    ("[forkserver]\npool_cpu = 100000.0", "$.forkserver.pool_cpu", "pool_cpu must be at most"),
    ("[forkserver]\npool_memory_bytes = 1024", "$.forkserver.pool_memory_bytes", "at least 4194304"),
    ("[forkserver]\npool_max_age_s = nan", "$.forkserver.pool_max_age_s", "pool_max_age_s must be positive"),
    ('docroot_roots = ["/srv", "www"]', "$.docroot_roots[1]", "not a normalised absolute path"),
    ('docroot_roots = ["/"]', "$.docroot_roots[0]", "any host directory"),
    ('docroot_roots = "/srv"', "$.docroot_roots", "Expected `array`"),
    ('[cluster]\nrole = "boss"', "$.cluster.role", "role 'boss' is not one of all, node, front"),
    ('[cluster]\nrole = "node"', "$.cluster.role", "role node needs a CMDB that every host shares"),
    ('[cmdb]\nurl = "postgresql://db/fcrun"\n[cluster]\nrole = "node"', "$.cluster.advertise",
     "a node must say where fronts reach it"),
    ('[cmdb]\nurl = "postgresql://db/fcrun"\n[cluster]\nrole = "node"\nadvertise = "n1"', "$.cluster.advertise",
     "HOST:PORT"),
    ('[cmdb]\nurl = "postgresql://db/fcrun"\n[cluster]\nrole = "front"\ncpu_overcommit = 0.0',
     "$.cluster.cpu_overcommit", "cpu_overcommit must be above 0"),
])
def test_errors_name_the_file_and_the_key(write, paths, text, where, words):
    path = write(text)
    with pytest.raises(SpecError) as info:
        load_config(path, paths)
    assert info.value.where == where
    assert str(info.value).startswith(f"{path}: ")
    assert words in str(info.value)
    assert info.value.exit_code == 2


def test_a_missing_file_and_bad_toml(write, paths, tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"), paths)
    with pytest.raises(SpecError, match="invalid TOML"):
        load_config(write("listen = "), paths)


def test_the_struct_alone_has_the_same_defaults():
    config = ServeConfig()
    assert config.listen == "0.0.0.0:8080" and config.admin_socket == ""  # load_config fills it in


@pytest.mark.parametrize("text,expected", [
    ("0.0.0.0:8080", ("0.0.0.0", 8080)),
    ("[::]:80", ("::", 80)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:http", "host:70000"])
def test_parse_address_rejects(text):
    with pytest.raises(SpecError, match="HOST:PORT"):
        parse_address(text)


def test_cluster_roles_and_names(write, paths):
    from fcrun.serve.config import advertised_address, node_name

    node = load_config(write('listen = "10.0.0.2:8080"\n[cmdb]\nurl = "postgresql://db/fcrun"\n'
                             '[cluster]\nrole = "node"\ncpu_capacity = 2.0'), paths)
    assert (node.cluster.role, node.cluster.cpu_capacity, advertised_address(node)) == ("node", 2.0, "10.0.0.2:8080")
    assert node_name(node).endswith(f":{paths.run_root}")
    front = load_config(write('[cmdb]\nurl = "postgresql://db/fcrun"\n[cluster]\nrole = "front"\nnode_name = "f1"'),
                        paths)
    assert node_name(front) == "f1"
