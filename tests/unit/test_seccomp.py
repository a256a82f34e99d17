"""Seccomp profiles without root: validation with JSON paths, reading PROFILE.json strictly,
compiling with libseccomp (the cache, skipped names), and the plan carrying the filter.
Loading filters into real containers is tests/security/test_seccomp_security.py."""

from __future__ import annotations

import errno
import json
import os

import msgspec
import pytest

from fcrun.errors import SpecError
from fcrun.runtime.spec import Seccomp, SeccompArg, SeccompSyscall, decode_spec, default_spec, encode_spec
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.seccomp import (
    DEFAULT_PROFILE, compile_filter, filter_flags, install_filter, load_profile, parse_security_opts, validate_profile,
)
from fcrun.seccomp import compiler
from fcrun.seccomp.libseccomp import library


def profile(*rules: SeccompSyscall, **fields) -> Seccomp:
    return Seccomp(default_action=fields.pop("default_action", "SCMP_ACT_ERRNO"), syscalls=list(rules), **fields)


def allow(*names: str, args=()) -> SeccompSyscall:
    return SeccompSyscall(names=list(names), action="SCMP_ACT_ALLOW", args=list(args))


# ----- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad, where", [
    (profile(default_action="SCMP_ACT_NOPE"), "$.linux.seccomp.defaultAction"),
    (profile(default_action="SCMP_ACT_NOTIFY"), "$.linux.seccomp.defaultAction"),
    (profile(default_errno_ret=5000), "$.linux.seccomp.defaultErrnoRet"),
    (profile(default_action="SCMP_ACT_ALLOW", default_errno_ret=1), "$.linux.seccomp.defaultErrnoRet"),
    (profile(architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_Z80"]), "$.linux.seccomp.architectures[1]"),
    (profile(flags=["SECCOMP_FILTER_FLAG_NEW_LISTENER"]), "$.linux.seccomp.flags[0]"),
    (profile(allow("read"), allow("write"), allow("getpid"), SeccompSyscall(names=["x"], action="SCMP_ACT_KILLL")),
     "$.linux.seccomp.syscalls[3].action"),
    (profile(SeccompSyscall(names=[], action="SCMP_ACT_ALLOW")), "$.linux.seccomp.syscalls[0].names"),
    (profile(allow("read", "wr ite")), "$.linux.seccomp.syscalls[0].names[1]"),
    (profile(allow("read", args=[SeccompArg(index=6, value=0, op="SCMP_CMP_EQ")])),
     "$.linux.seccomp.syscalls[0].args[0].index"),
    (profile(allow("read", args=[SeccompArg(index=0, value=0, op="SCMP_CMP_EQ"), SeccompArg(index=1, value=0, op="EQ")])),
     "$.linux.seccomp.syscalls[0].args[1].op"),
    (profile(allow("read", args=[SeccompArg(index=0, value=1 << 64, op="SCMP_CMP_EQ")])),
     "$.linux.seccomp.syscalls[0].args[0].value"),
])
def test_a_bad_profile_is_refused_at_its_json_path(bad, where):
    with pytest.raises(SpecError) as info:
        validate_profile(bad)
    assert info.value.where == where, str(info.value)


def test_the_default_profile_is_valid_and_in_every_default_spec():
    validate_profile(DEFAULT_PROFILE)
    spec = default_spec(["true"])
    assert spec.linux.seccomp is DEFAULT_PROFILE


def test_a_config_json_with_a_bad_profile_is_refused_at_its_path():
    spec = default_spec(["true"])
    data = json.loads(encode_spec(spec))
    data["linux"]["seccomp"]["syscalls"][2]["action"] = "SCMP_ACT_BOGUS"
    with pytest.raises(SpecError) as info:
        decode_spec(json.dumps(data).encode())
    assert info.value.where == "$.linux.seccomp.syscalls[2].action"


def test_the_default_profile_refuses_what_docker_refuses_and_allows_the_rest():
    allowed = {n for rule in DEFAULT_PROFILE.syscalls if rule.action == "SCMP_ACT_ALLOW" and not rule.args for n in rule.names}
    for name in ("keyctl", "add_key", "request_key", "bpf", "userfaultfd", "perf_event_open", "kexec_load",
                 "kexec_file_load", "init_module", "finit_module", "delete_module", "mount", "umount2",
                 "unshare", "setns", "pivot_root", "open_by_handle_at", "ptrace", "process_vm_readv",
                 "io_uring_setup", "io_uring_enter", "io_uring_register", "socketcall", "clone", "clone3",
                 "personality", "socket", "reboot", "swapon", "acct", "syslog"):
        assert name not in allowed, name
    for name in ("read", "execve", "execveat", "chroot", "fork", "wait4", "capset", "setresuid", "prctl",
                 "close_range", "epoll_pwait2", "rseq"):
        assert name in allowed, name
    [clone3] = [r for r in DEFAULT_PROFILE.syscalls if r.names == ["clone3"]]
    assert (clone3.action, clone3.errno_ret) == ("SCMP_ACT_ERRNO", errno.ENOSYS)
    assert DEFAULT_PROFILE.default_errno_ret == errno.EPERM


# ----- PROFILE.json -------------------------------------------------------------------------


def write(tmp_path, doc) -> str:
    path = tmp_path / "profile.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_an_oci_or_docker_profile_file_loads(tmp_path):
    path = write(tmp_path, {
        "comment": "mine", "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64"], "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "args": None, "comment": ""},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
        ],
    })
    loaded = load_profile(path)
    assert loaded.syscalls[1].args == [SeccompArg(index=0, value=8, op="SCMP_CMP_EQ")]
    assert filter_flags(loaded) == 4


@pytest.mark.parametrize("doc, where, words", [
    ({"defaultAction": "SCMP_ACT_ERRNO", "archMap": []}, "$.archMap", "archMap"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ALLOW",
      "includes": {"caps": ["CAP_SYS_ADMIN"]}}]}, "$.syscalls[0].includes", "conditions are not supported"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"name": "read", "action": "SCMP_ACT_ALLOW"}]},
     "$.syscalls[0].name", "names"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
      "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ", "valueThree": 2}]}]}, "$.syscalls[0].args[0].valueThree", ""),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALOW"}]},
     "$.syscalls[0].action", "SCMP_ACT_ALOW"),
])
def test_a_profile_file_with_an_unknown_field_or_value_names_file_and_path(tmp_path, doc, where, words):
    path = write(tmp_path, doc)
    with pytest.raises(SpecError) as info:
        load_profile(path)
    assert info.value.where == where
    assert path in str(info.value) and words in str(info.value)


def test_a_profile_file_of_the_wrong_shape_is_a_spec_error(tmp_path):
    for doc in ("{not json", "[]", {"syscalls": []}, {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": "read", "action": "SCMP_ACT_ALLOW"}]}):
        with pytest.raises(SpecError, match="profile.json"):
            load_profile(write(tmp_path, doc))
    with pytest.raises(SpecError, match=r"read seccomp profile .*missing.json: \[Errno 2\]"):
        load_profile(str(tmp_path / "missing.json"))


def test_security_opts_choose_default_unconfined_or_a_file(tmp_path):
    path = write(tmp_path, {"defaultAction": "SCMP_ACT_ALLOW"})
    assert parse_security_opts([]) == "default"
    assert parse_security_opts(["seccomp=unconfined"]) == "unconfined"
    assert parse_security_opts([f"seccomp={path}"]) == Seccomp(default_action="SCMP_ACT_ALLOW")
    assert parse_security_opts([f"seccomp={path}", "seccomp=default"]) == "default"  # the last wins
    for bad in ("apparmor=unconfined", "seccomp", "seccomp=", "no-new-privileges"):
        with pytest.raises(SpecError) as info:
            parse_security_opts([bad])
        assert info.value.where == "--security-opt"


def test_run_options_put_the_profile_in_the_spec():
    assert spec_from_image(None, RunOptions(args=["true"])).linux.seccomp is DEFAULT_PROFILE
    assert spec_from_image(None, RunOptions(args=["true"], seccomp="unconfined")).linux.seccomp is None
    own = profile(allow("read"))
    assert spec_from_image(None, RunOptions(args=["true"], seccomp=own)).linux.seccomp is own


# ----- compiling ----------------------------------------------------------------------------


def test_compiling_gives_bpf_and_the_default_profile_is_compiled_once(monkeypatch):
    compiler.clear_cache()
    calls = []
    real = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda p, w: calls.append(p) or real(p, w))
    bpf = compile_filter(DEFAULT_PROFILE)
    assert len(bpf) % 8 == 0 and 0 < len(bpf) // 8 <= 4096
    # Shared object or an equal copy (a spec read back from state.json): the cached program.
    copy = msgspec.json.decode(msgspec.json.encode(DEFAULT_PROFILE), type=Seccomp)
    assert compile_filter(DEFAULT_PROFILE) == compile_filter(copy) == bpf
    assert len(calls) == 1


# The cache on disk (Paths.seccomp_cache): what another process compiled, taken only when it is
# whole and nobody but root could have written or swapped it in.


@pytest.fixture
def disk_cache(tmp_path, monkeypatch):
    """(cache dir, compile calls): each compile_filter call starts with an empty in-process cache,
    as a new process does."""
    calls = []
    real = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda p, w: calls.append(p) or real(p, w))
    directory = str(tmp_path / "seccomp")

    def compile_in_new_process(p=DEFAULT_PROFILE) -> bytes:
        compiler.clear_cache()
        return compile_filter(p, cache_dir=directory)

    yield directory, calls, compile_in_new_process
    compiler.clear_cache()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _cache_file(directory: str) -> str:
    [name] = os.listdir(directory)
    return os.path.join(directory, name)


def test_a_program_compiled_once_is_read_back_by_the_next_process(disk_cache):
    directory, calls, compile_new = disk_cache
    compiler.clear_cache()
    expected = compile_filter(DEFAULT_PROFILE)  # no cache dir: compiled
    assert compile_new() == expected and len(calls) == 2
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.stat(_cache_file(directory)).st_mode & 0o777 == 0o600
    assert compile_new() == expected and len(calls) == 2  # read, not compiled
    other = profile(allow("read"))
    assert compile_new(other) == compile_filter(other, cache_dir=None) and len(os.listdir(directory)) == 2


def test_a_damaged_or_torn_cache_file_is_compiled_anew(disk_cache):
    directory, calls, compile_new = disk_cache
    good = compile_new()
    path = _cache_file(directory)
    data = _read(path)
    for damaged in (data[:-8], data[:-1], data[:40] + bytes([data[40] ^ 1]) + data[41:], b""):
        with open(path, "wb") as f:
            f.write(damaged)
        before = len(calls)
        assert compile_new() == good and len(calls) == before + 1
        assert _read(path) == data  # and written again whole


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another owner needs root to make")
def test_a_planted_program_is_not_loaded(disk_cache):
    """The attack: a program that allows every syscall, in the cache under the default profile's
    name, whole (its hash right), but writable by others, owned by another user, or in a
    directory others may write to (where a file can be swapped in by a rename). None is used."""
    directory, calls, compile_new = disk_cache
    good = compile_new()
    path = _cache_file(directory)
    permissive = compile_filter(profile(default_action="SCMP_ACT_ALLOW"))
    planted = compiler.blake2b(permissive, digest_size=compiler.DIGEST_BYTES).digest() + permissive
    for plant in ("group-writable", "other owner", "open directory"):
        with open(path, "wb") as f:
            f.write(planted)
        os.chmod(path, 0o620 if plant == "group-writable" else 0o600)
        os.chown(path, 65534 if plant == "other owner" else 0, 0)
        os.chmod(directory, 0o777 if plant == "open directory" else 0o700)
        before = len(calls)
        assert compile_new() == good, plant
        assert len(calls) == before + 1, plant
    # The same file, root's alone: taken (so the checks above are what refused it).
    os.chmod(directory, 0o700)
    with open(path, "wb") as f:
        f.write(planted)
    os.chmod(path, 0o600)
    os.chown(path, 0, 0)
    assert compile_new() == permissive


def test_a_cache_dir_that_cannot_be_made_only_costs_a_compile(disk_cache, tmp_path):
    _, calls, _ = disk_cache
    compiler.clear_cache()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compile_filter(DEFAULT_PROFILE, cache_dir=str(blocker / "seccomp")) == compile_filter(DEFAULT_PROFILE)
    assert len(calls) == 1


def test_a_changed_profile_compiles_anew():
    base = compile_filter(profile(allow("read")))
    assert compile_filter(profile(allow("read", "write"))) != base


def test_unknown_syscall_names_are_skipped_as_runc_does():
    known = profile(allow("read"))
    with_unknown = profile(allow("read", "no_such_syscall_ever"), allow("another_made_up"))
    assert compile_filter(with_unknown) == compile_filter(known)
    # A name only other ABIs have (i386's chown32) is skipped on a native-only filter too.
    assert compile_filter(profile(allow("read", "chown32"))) == compile_filter(known)


def test_libseccomp_knows_the_default_profiles_core_names():
    lib = library()
    for name in ("read", "clone", "clone3", "socket", "personality", "execveat"):
        assert lib.syscall_resolve_name(name) >= 0, name


def test_a_rule_libseccomp_refuses_is_a_spec_error_at_its_path(monkeypatch):
    # Validation leaves libseccomp nothing to refuse; should it still, the path is named.
    from fcrun.seccomp import libseccomp

    real = libseccomp.LibSeccomp.rule_add
    getpid = library().syscall_resolve_name("getpid")

    def refuse_getpid(self, ctx, action, number, args):
        if number == getpid:
            raise OSError(errno.EINVAL, "seccomp_rule_add: Invalid argument")
        real(self, ctx, action, number, args)

    monkeypatch.setattr(libseccomp.LibSeccomp, "rule_add", refuse_getpid)
    with pytest.raises(SpecError) as info:
        compile_filter(profile(allow("read"), allow("write", "getpid")))
    assert info.value.where == "$.linux.seccomp.syscalls[1].names[1]"
    assert "'getpid'" in str(info.value) and "Invalid argument" in str(info.value)


def test_conditions_on_one_argument_are_alternatives_as_in_runc():
    # libseccomp refuses two conditions on one argument in one rule; runc makes them two rules.
    either = profile(allow("personality", args=[SeccompArg(index=0, value=0, op="SCMP_CMP_EQ"),
                                                SeccompArg(index=0, value=8, op="SCMP_CMP_EQ")]))
    split = profile(allow("personality", args=[SeccompArg(index=0, value=0, op="SCMP_CMP_EQ")]),
                    allow("personality", args=[SeccompArg(index=0, value=8, op="SCMP_CMP_EQ")]))
    assert compile_filter(either) == compile_filter(split)


def test_install_filter_refuses_what_is_not_a_program():
    for bad in (b"", b"\0" * 7):
        with pytest.raises(OSError) as info:
            install_filter(bad)
        assert info.value.errno == errno.EINVAL


def test_the_plan_carries_the_compiled_filter_and_flags():
    from fcrun.runtime.plan import build_plan

    spec = default_spec(["true"])
    plan = build_plan(spec, rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True)
    assert plan.seccomp_filter == compile_filter(DEFAULT_PROFILE) and plan.seccomp_flags == 0
    spec.linux.seccomp = None
    plan = build_plan(spec, rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40, attached=True)
    assert plan.seccomp_filter == b""


def test_a_filter_crosses_to_the_spawner_intact():
    from fcrun.runtime.spawner import protocol
    from fcrun.runtime.plan import build_plan

    plan = build_plan(default_spec(["true"]), rootfs="/r", overlay_lower=None, cgroup_procs=[], cap_last=40,
                      attached=True)
    wire = protocol.decode_spawn(protocol.encode(protocol.Spawn(plan=plan)))
    assert wire.plan.seccomp_filter == plan.seccomp_filter
    bad = msgspec.structs.replace(wire, plan=msgspec.structs.replace(wire.plan, seccomp_filter=b"\0" * 12))
    with pytest.raises(SpecError) as info:
        protocol.check_spawn(bad, protocol.CHILD_FDS, 40)
    assert info.value.where == "$.plan.seccomp_filter"


def test_a_loaded_default_filter_refuses_unshare_in_a_child():
    """The real kernel, no root needed: no_new_privs, then the filter, in a forked child."""
    from fcrun import syscalls as sc

    bpf = compile_filter(DEFAULT_PROFILE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            install_filter(bpf)
            try:
                sc.unshare(sc.CLONE_NEWUSER)
                result = b"ok"
            except OSError as exc:
                result = str(exc.errno).encode()
            os.write(w, result)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = f.read()
    os.waitpid(pid, 0)
    assert result == str(errno.EPERM).encode()
