"""`fcrun-oci` without containers: flags, errors and logs as runc gives them, what it prints.

Root tests (tests/root/test_oci_cli_root.py) run the commands on real containers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from fcrun.errors import SpecError
from fcrun.runtime.spec import decode_spec
from fcrun.units import parse_signal
from fcrun_cli import oci, oci_commands, oci_report

LAUNCHER = os.path.join(os.path.dirname(__file__), "..", "..", "cli", "fcrun-oci")


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = oci.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_is_runc_like(capsys):
    code, out, _ = run_main(capsys, "--version")
    name, spec = out.splitlines()
    assert code == 0 and name.startswith("fcrun-oci version ") and spec.startswith("spec: 1.")


def test_the_launcher_runs_the_cli():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    r = subprocess.run([LAUNCHER, "--version"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("fcrun-oci version "), r.stderr


def test_features_is_oci_features_json(capsys):
    code, out, _ = run_main(capsys, "features")
    features = json.loads(out)
    assert code == 0
    assert features["ociVersionMin"] == "1.0.0"
    assert {"pid", "mount", "network", "user"} <= set(features["linux"]["namespaces"])
    assert "CAP_SYS_ADMIN" in features["linux"]["capabilities"]
    assert features["linux"]["cgroup"]["systemd"] is False
    assert "nosuid" in features["mountOptions"]


def test_spec_writes_a_decodable_config_and_never_overwrites(capsys, tmp_path):
    code, _, err = run_main(capsys, "spec", "--bundle", str(tmp_path))
    assert code == 0, err
    config = (tmp_path / "config.json").read_bytes()
    spec = decode_spec(config)
    assert spec.root.path == "rootfs" and spec.process.args == ["sh"]
    process = json.loads(config)["process"]
    assert (process["cwd"], process["user"], process["terminal"]) == ("/", {"uid": 0, "gid": 0}, False)  # runc wants cwd
    code, _, err = run_main(capsys, "spec", "--bundle", str(tmp_path))
    assert code == 1 and "exists" in err and len(err.splitlines()) == 1
    assert (tmp_path / "config.json").read_bytes() == config


def test_errors_are_one_line_exit_1_and_logged_as_json(capsys, tmp_path):
    log = tmp_path / "log.json"
    code, out, err = run_main(capsys, "--root", str(tmp_path / "root"), "--log", str(log), "--log-format", "json",
                              "state", "nosuch")
    assert (code, out, err) == (1, "", "container does not exist\n")
    entry = json.loads(log.read_text())
    assert entry["level"] == "error" and entry["msg"] == "container does not exist"
    assert entry["time"].endswith("Z")


def test_text_log_format_is_logrus_like(capsys, tmp_path):
    log = tmp_path / "log.txt"
    code, _, _ = run_main(capsys, "--root", str(tmp_path), "--log", str(log), "start", "nosuch")
    assert code == 1
    assert 'level=error msg="container does not exist"' in log.read_text()


def test_systemd_cgroup_and_rootless_are_refused(capsys, tmp_path):
    code, _, err = run_main(capsys, "--root", str(tmp_path), "--systemd-cgroup", "list")
    assert code == 1 and "--systemd-cgroup is not supported" in err
    code, _, err = run_main(capsys, "--root", str(tmp_path), "--rootless", "true", "list")
    assert code == 1 and "rootless" in err


def test_delete_force_of_a_missing_container_succeeds_as_runc(capsys, tmp_path):
    assert run_main(capsys, "--root", str(tmp_path), "delete", "--force", "nosuch")[0] == 0
    code, _, err = run_main(capsys, "--root", str(tmp_path), "delete", "nosuch")
    assert (code, err) == (1, "container does not exist\n")


def test_list_of_an_empty_root(capsys, tmp_path):
    code, out, _ = run_main(capsys, "--root", str(tmp_path), "list", "--format", "json")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = run_main(capsys, "--root", str(tmp_path), "list")
    assert out.split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]


@pytest.mark.parametrize("breakage, message", [
    (None, "config.json not found"),
    (b"{", "malformed JSON"),
    (b'{"ociVersion": "1.0.2", "process": {"args": ["true"], "frobnicate": 1}, "root": {"path": "rootfs"}}',
     "frobnicate"),
])
def test_bad_bundle_is_one_line(capsys, tmp_path, breakage, message):
    if breakage is not None:
        (tmp_path / "config.json").write_bytes(breakage)
    code, _, err = run_main(capsys, "--root", str(tmp_path / "root"), "create", "--bundle", str(tmp_path), "x")
    assert code == 1 and message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "root" / "containers" / "x")


def test_bundle_root_path_is_relative_to_the_bundle(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/"}, "root": {"path": "rootfs"},
         "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}))
    bundle, spec = oci_commands.load_bundle(str(tmp_path))
    assert bundle == str(tmp_path) and spec.root.path == str(tmp_path / "rootfs")


@pytest.mark.parametrize("text, number", [("KILL", 9), ("SIGTERM", 15), ("usr1", signal.SIGUSR1), ("2", 2)])
def test_signals_by_name_or_number(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["NOPE", "0", "999"])
def test_bad_signals_are_refused(text):
    with pytest.raises(SpecError, match="signal"):
        parse_signal(text)


def test_two_roots_get_two_cgroup_parents(monkeypatch):
    monkeypatch.delenv("FCRUN_OCI_CGROUP_PARENT", raising=False)
    assert oci.cgroup_parent_for(oci.DEFAULT_ROOT) == "fcrun-oci"
    a, b = oci.cgroup_parent_for("/run/a"), oci.cgroup_parent_for("/run/b")
    assert a != b and a.startswith("fcrun-oci-")


class FakeSpec:
    oci_version = "1.0.2"
    annotations = {"io.podman": "x"}

    class root:
        path = "/b/rootfs"


@pytest.mark.parametrize("status, oci_status, has_pid", [
    ("created", "created", True), ("running", "running", True), ("frozen", "paused", True),
    ("stopped", "stopped", False),
])
def test_state_json(status, oci_status, has_pid):
    state = oci_report.state_json("c", status, 42, 0.5, {oci_report.BUNDLE_LABEL: "/b"}, FakeSpec)
    assert state["status"] == oci_status and state["pid"] == (42 if has_pid else 0)
    assert (state["id"], state["bundle"], state["rootfs"]) == ("c", "/b", "/b/rootfs")
    assert state["created"] == "1970-01-01T00:00:00.500000000Z"
    assert state["annotations"] == {"io.podman": "x"}


def test_list_table_pads_columns_as_tabwriter():
    rows = [{"id": "a-long-container-id", "pid": 7, "status": "running", "bundle": "/b", "created": "T", "owner": ""}]
    header, row = oci_report.list_table(rows).splitlines()
    assert header.index("PID") == row.index("7") == len("a-long-container-id") + 1
    assert row.endswith("root")


def test_ps_table_keeps_the_container_pids():
    output = "UID PID PPID CMD\nroot 1 0 init\nroot 42 1 sleep\nroot 43 1 other\n"
    assert oci_report.ps_table(output, {42}) == "UID PID PPID CMD\nroot 42 1 sleep\n"


def test_a_usage_error_is_one_line_and_exit_1(capsys, tmp_path):
    code, _, err = run_main(capsys, "--root", str(tmp_path), "update", "--l3-cache-schema", "5", "x")
    assert code == 1 and "unrecognized arguments: --l3-cache-schema" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("interval", ["fast", "0s"])
def test_bad_event_intervals_are_one_line(capsys, tmp_path, interval):
    code, _, err = run_main(capsys, "--root", str(tmp_path), "events", "--interval", interval, "x")
    assert code == 1 and "--interval" in err and len(err.splitlines()) == 1, err


def test_a_system_error_names_its_file_and_debug_logs_the_traceback(capsys, tmp_path):
    log = tmp_path / "log"
    code, _, err = run_main(capsys, "--root", str(tmp_path), "--debug", "--log", str(log), "update",
                            "--resources", str(tmp_path / "missing.json"), "x")
    assert (code, err) == (1, f"{tmp_path / 'missing.json'}: No such file or directory\n")
    text = log.read_text()
    assert "level=debug" in text and "Traceback" in text and "level=error" in text


# ----- the fast path (cli/oci_fast.py): the launcher's paths, the hand parser -----------------

from fcrun_cli import oci_fast  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("argv", [
    ["create", "c1"],
    ["--root", "/run/x", "--log", "/l", "--log-format", "json", "create", "--bundle", "/b", "--pid-file", "/p",
     "--console-socket", "/s", "c1"],
    ["--root=/run/x", "--log-format=text", "create", "-b", "/b", "c1", "--pid-file=/p", "--no-pivot",
     "--no-new-keyring", "--preserve-fds", "0"],
    ["--debug", "--rootless", "false", "start", "c1"],
    ["state", "c1"],
    ["delete", "c1"], ["delete", "-f", "c1"], ["delete", "c1", "--force"],
    ["kill", "c1"], ["kill", "-a", "c1", "KILL"], ["kill", "c1", "9", "--all"],
    ["--root", "/r", "start", "-"],
])
def test_fast_parse_reads_as_argparse_does(argv):
    expected = oci.build_parser().parse_args(argv)
    assert oci_fast.parse(argv) == oci_fast.Namespace(**vars(expected))


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["-v"], ["--systemd-cgroup", "start", "c1"], ["list"], ["start"], ["start", "a", "b"],
    ["create", "--bundle"], ["create", "--bundle", "-x", "c1"], ["create", "--bund", "/b", "c1"],
    ["create", "-b/b", "c1"], ["delete", "-fa", "c1"], ["create", "--preserve-fds", "x", "c1"],
    ["create", "--", "c1"], ["start", "--root", "/r", "c1"], ["--ro", "/r", "start", "c1"],
])
def test_fast_parse_leaves_other_forms_to_argparse(argv):
    with pytest.raises(oci_fast.Fallback):
        oci_fast.parse(argv)


@pytest.mark.parametrize("root, expected", [
    ("/run/x", "/run/x/oci"), ("/run/x/", "/run/x/oci"), ("/", "/oci"), ("run/x", None), ("/run/../x", None),
    ("/run//x", None),
])
def test_fast_holder_dir_is_options_holder_dir(root, expected):
    args = oci_fast.parse(["--root", root, "start", "c1"])
    assert oci_fast.holder_dir(args) == expected
    if expected is not None:
        assert expected == oci.Options(args).holder_dir
    debug = oci_fast.parse(["--debug", "--root", "/r", "start", "c1"])
    assert oci_fast.holder_dir(debug) is None  # oci.main logs the command line first


def test_fast_constants_are_the_library_s():
    from fcrun.runtime.hooks import BUNDLE_LABEL

    assert oci_fast.DEFAULT_ROOT == oci.DEFAULT_ROOT
    assert oci_report.BUNDLE_LABEL == BUNDLE_LABEL


def test_fast_start_without_a_holder_says_what_the_full_command_says(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    r = subprocess.run([LAUNCHER, "--root", str(tmp_path), "start", "nosuch"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stderr) == (1, "container does not exist\n")


@pytest.mark.parametrize("layout", ["pip install .", "pip install -e ."])
def test_the_launcher_finds_the_library_in_both_install_layouts(tmp_path, layout):
    """A prefix as pip makes it (bin/, lib/python3.X/site-packages/), its python3 the base
    interpreter (no venv: its own site has no fcrun), so only the launcher's paths can make
    `state` (the library, msgspec) work."""
    import msgspec

    bin_dir = tmp_path / "bin"
    site = tmp_path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    bin_dir.mkdir()
    site.mkdir(parents=True)
    os.symlink(os.path.realpath(sys.executable), bin_dir / "python3")
    launcher = bin_dir / "fcrun-oci"
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o755)
    os.symlink(os.path.dirname(msgspec.__file__), site / "msgspec")
    if layout == "pip install .":
        os.symlink(os.path.join(REPO, "cli"), site / "fcrun_cli")
        os.symlink(os.path.join(REPO, "src", "fcrun"), site / "fcrun")
    else:
        record = site / "fcrun-0.1.0.dist-info"
        record.mkdir()
        (record / "direct_url.json").write_text(json.dumps({"dir_info": {"editable": True}, "url": f"file://{REPO}"}))
    env = {"PATH": "/usr/bin:/bin"}  # not the venv's python3
    r = subprocess.run([str(launcher), "--root", str(tmp_path / "root"), "state", "nosuch"], env=env,
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, "container does not exist\n")
    r = subprocess.run(["bin/fcrun-oci", "features"], env=env, capture_output=True, text=True, timeout=30,
                       cwd=tmp_path)  # a relative launcher path: sys.path gets absolute paths
    assert r.returncode == 0 and json.loads(r.stdout)["ociVersionMin"] == "1.0.0", r.stderr


def test_fcrun_bench_oci_cli_passes_its_options_to_the_bench(monkeypatch):
    """`fcrun bench oci-cli` is bench/oci_cli.py's main with the same options."""
    from click.testing import CliRunner

    from fcrun_cli import bench

    calls = []
    monkeypatch.setattr(bench, "_run", lambda name, argv, **kw: calls.append((name, argv, kw)))
    r = CliRunner().invoke(bench.bench, ["oci-cli", "--runs", "5", "--podman-runs", "0", "--runtime", "/x/fcrun-oci",
                                         "--without-mount", "/sys/fs/cgroup", "--json"])
    assert r.exit_code == 0, r.output
    assert calls == [("oci_cli", ["--runs", "5", "--warmup", "3", "--podman-runs", "0", "--runtime", "/x/fcrun-oci",
                                  "--without-mount", "/sys/fs/cgroup"], {"as_json": True})]


def test_fast_delete_of_nothing_is_runc_s_and_a_leftover_socket_goes(tmp_path):
    """delete of a container with no state directory is answered without the library; a holder's
    leftover socket (a killed holder) sends it to the full command, which removes it."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])

    def launch(*args):
        return subprocess.run([LAUNCHER, "--root", str(tmp_path), *args], env=env, capture_output=True, text=True,
                              timeout=30)

    assert (launch("delete", "--force", "nosuch").returncode, launch("delete", "-f", "nosuch").stderr) == (0, "")
    r = launch("delete", "nosuch")
    assert (r.returncode, r.stderr) == (1, "container does not exist\n")
    (tmp_path / "oci").mkdir()
    (tmp_path / "oci" / "gone.sock").write_bytes(b"")
    r = launch("delete", "--force", "gone")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "oci" / "gone.sock").exists()
