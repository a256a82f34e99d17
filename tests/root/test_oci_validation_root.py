"""The OCI runtime-tools validation suite against fcrun-oci, compared test by test with runc in the same run.

../shared/oci-runtime-tools/run.sh RUNTIME builds the suite once (offline, Debian's golang-go: scripts/setup.sh
installs it) into /tmp/fcrun-rtval, runs its 58 validation/*.t tests one after another and writes one verdict
per test to /tmp/fcrun-rtval/last-<binary>.summary: "clean" is exit 0, no "not ok" and no stray error
diagnostic. Counts of ok lines mislead (runc wrongly runs process_capabilities_fail's bogus capability and
scores ~270 ok lines for it), so the rule checked here is per test: every test clean under runc is clean under
fcrun-oci, except the ones in KNOWN_GAPS, each with the reason. A gap that now passes fails the test too, so
the list only shrinks.

CI runs all 58 tests for both runtimes (runc takes about 70 s here, the build about 25 s once). A run can be
narrowed with FCRUN_RTVAL_TESTS="create kill ..." (space-separated test names). Bounds, so that a runtime that
hangs cannot hold CI: FCRUN_RTVAL_TIMEOUT seconds per test (default 30; runc's slowest here takes 13) and
FCRUN_RTVAL_BUDGET seconds per runtime (default 600); a test the budget left out counts as not clean.
"""

from __future__ import annotations

import glob
import os
import subprocess

import pytest
from ociruntimes import FCRUN_OCI_ABSENT, REPO, fcrun_oci_path, runc_path

RUN_SH = os.environ.get("FCRUN_RTVAL_SH", os.path.join(os.path.dirname(REPO), "shared", "oci-runtime-tools", "run.sh"))
RTVAL_HOME = "/tmp/fcrun-rtval"          # run.sh's build and result dir
RTVAL_BUNDLES = os.path.join(RTVAL_HOME, "tmp")  # the tests' TMPDIR: their bundles (ocitest*) land here
PER_TEST_TIMEOUT_S = int(os.environ.get("FCRUN_RTVAL_TIMEOUT", "30"))
BUDGET_S = int(os.environ.get("FCRUN_RTVAL_BUDGET", "600"))

# Tests clean under runc that fcrun-oci does not pass yet: test name -> why. Only ever remove entries:
# test_fcrun_oci_is_clean_wherever_runc_is fails when one of them passes, telling to remove it.
# From the runs of 2026-12-04 (fcrun-oci of the issue 13 work in progress): at 21:55 UTC 25 of 58 clean, at 22:25
# 26 (linux_devices went); runc 31.
KNOWN_GAPS: dict[str, str] = {
}


def parse_summary(text: str) -> dict[str, str]:
    """run.sh's .summary ("NAME clean|failed rc=.. secs=.. ...", one line per test) -> {name: the whole line}."""
    verdicts = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in ("clean", "failed"):
            verdicts[fields[0]] = line
    return verdicts


def is_clean(line: str | None) -> bool:
    return line is not None and line.split()[1] == "clean"


def compare(baseline: dict[str, str], candidate: dict[str, str], known_gaps: dict[str, str],
            selected: list[str]) -> list[str]:
    """What is wrong with candidate's verdicts against baseline's, over the selected tests; [] when nothing is.

    Each problem is one line: a test clean under the baseline and not under the candidate (nor a known gap),
    a known gap that is now clean (remove it), a known gap that names no test of the suite.
    """
    problems = []
    for name in selected:
        if not is_clean(baseline.get(name)):
            continue
        line = candidate.get(name)
        if not is_clean(line) and name not in known_gaps:
            problems.append(f"{name}: clean under runc, not under fcrun-oci: {line or 'not run (budget spent)'}")
    for name, why in known_gaps.items():
        if name in selected and is_clean(candidate.get(name)):
            problems.append(f"{name}: in KNOWN_GAPS ({why}) but clean under fcrun-oci now: remove it from KNOWN_GAPS")
    return problems


def test_compare_finds_regressions_and_stale_gaps():
    runc = parse_summary("a clean rc=0\nb clean rc=0\nc failed rc=1\nd clean rc=0\ne clean rc=0\n")
    oci = parse_summary("a clean rc=0\nb failed rc=0 not_ok=2\nc clean rc=0\nd failed rc=1\n")
    problems = compare(runc, oci, {"d": "no hooks yet"}, ["a", "b", "c", "d", "e"])
    assert problems == ["b: clean under runc, not under fcrun-oci: b failed rc=0 not_ok=2",
                        "e: clean under runc, not under fcrun-oci: not run (budget spent)"]
    assert compare(runc, oci, {"a": "was slow"}, ["a"]) == [
        "a: in KNOWN_GAPS (was slow) but clean under fcrun-oci now: remove it from KNOWN_GAPS"]
    assert compare(runc, oci, {"a": "was slow"}, ["b"]) != []  # b regressed; a is outside the selection
    assert compare(runc, runc, {}, ["a", "b", "c", "d", "e"]) == []


def suite_tests() -> list[str]:
    """The names of the suite's tests in the build (after a first run.sh)."""
    return sorted(os.path.basename(p)[:-2] for p in glob.glob(os.path.join(RTVAL_HOME, "src", "validation", "*", "*.t")))


def run_suite(runtime: str, tests: list[str] | None) -> dict[str, str]:
    """run.sh RUNTIME over tests (None: all); its per-test verdicts.

    Raises:
        AssertionError: run.sh failed (build, install), with its stderr.
    """
    env = dict(os.environ, RTVAL_TIMEOUT=str(PER_TEST_TIMEOUT_S), RTVAL_BUDGET=str(BUDGET_S))
    if tests:
        env["RTVAL_TESTS"] = " ".join(tests)
    r = subprocess.run([RUN_SH, runtime], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=BUDGET_S + 3 * PER_TEST_TIMEOUT_S + 600)  # + the build, once
    assert r.returncode == 0, f"{RUN_SH} {runtime} failed ({r.returncode}): {r.stderr[-4000:]}"
    print(f"{os.path.basename(runtime)}: {r.stdout.strip()}\n{r.stderr.strip()}")
    with open(os.path.join(RTVAL_HOME, f"last-{os.path.basename(runtime)}.summary")) as f:
        return parse_summary(f.read())


def result_file(runtime: str, suffix: str) -> str:
    """run.sh's last-<binary><suffix> file of the runtime; "" if there is none."""
    try:
        with open(os.path.join(RTVAL_HOME, f"last-{os.path.basename(runtime)}{suffix}")) as f:
            return f.read()
    except OSError:
        return ""


def first_lines(lines: list[str], max_lines: int) -> str:
    more = [f"... ({len(lines) - max_lines} more lines)"] if len(lines) > max_lines else []
    return "\n".join(lines[:max_lines] + more)


def stderr_of(runtime: str, test: str, max_lines: int = 15) -> str:
    """The test's stderr in run.sh's .err file (its last try: "### NAME" or "### NAME (again)" heads each), cut to
    max_lines."""
    text = result_file(runtime, ".err")
    lines, current = [], None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line[4:].removesuffix(" (again)")
            if current == test:
                lines = []  # a second try replaces the first
            continue
        if current == test:
            lines.append(line)
    return first_lines(lines, max_lines)


def tap_failures(runtime: str, test: str, max_lines: int = 15) -> str:
    """The test's "not ok" lines in run.sh's .tap, with their diagnostics (# lines, error, stderr, actual), cut to
    max_lines."""
    text = result_file(runtime, ".tap")
    lines, current, failing = [], None, False
    for line in text.splitlines():
        if line.startswith("# rtval: "):
            current, failing = line[len("# rtval: "):], False
        elif current != test:
            continue
        elif line.startswith(("ok ", "1..")):
            failing = False
        elif line.startswith("not ok"):
            failing = True
            lines.append(line)
        elif failing and (line.startswith("# ") or
                          line.lstrip().startswith(('"error"', '"stderr"', '"actual"', '"expected"'))):
            lines.append(line)
    return first_lines(lines, max_lines)


def container_ids(runtime: str) -> set[str]:
    r = subprocess.run([runtime, "list", "-q"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{runtime} list -q failed: {r.stderr}"
    return set(r.stdout.split())


def left_by_the_suite() -> list[str]:
    """What the suite's tests could leave on the host: bundles, mounts under the build dir, processes whose root is
    a bundle, the tests' fixed cgroups."""
    left = [f"bundle {os.path.join(RTVAL_BUNDLES, n)}" for n in sorted(os.listdir(RTVAL_BUNDLES))] \
        if os.path.isdir(RTVAL_BUNDLES) else []
    with open("/proc/self/mountinfo") as f:
        left += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(RTVAL_HOME + "/")]
    for mountinfo in glob.glob("/proc/[0-9]*/mountinfo"):
        try:
            with open(mountinfo) as f:
                roots = [line.split()[3] for line in f if line.split()[4] == "/"]
        except OSError:
            continue  # gone meanwhile
        if any("/fcrun-rtval/tmp/ocitest" in root for root in roots):  # the path within its filesystem
            left.append(f"process {mountinfo.split('/')[2]} rooted in a bundle")
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(dirpath) in ("cgrouptest", "testdir"):
            left.append(f"cgroup {dirpath}")
            dirnames[:] = []
        elif dirpath.count("/") > 6:
            dirnames[:] = []
    return left


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(2 * (BUDGET_S + 3 * PER_TEST_TIMEOUT_S) + 900)
def test_fcrun_oci_is_clean_wherever_runc_is():
    oci = fcrun_oci_path()
    if oci is None:
        pytest.skip(FCRUN_OCI_ABSENT)
    runc = runc_path()
    if runc is None:
        pytest.skip("runc not installed (scripts/setup.sh installs it): no baseline")
    if not os.path.isfile(RUN_SH):
        pytest.skip(f"no runtime-tools runner at {RUN_SH} (the shared checkout beside the repository)")
    selected = os.environ.get("FCRUN_RTVAL_TESTS", "").split() or None
    before = {runtime: container_ids(runtime) for runtime in (runc, oci)}

    baseline = run_suite(runc, selected)
    candidate = run_suite(oci, selected)

    names = selected or suite_tests()
    assert len(names) > 50 or selected, f"only {len(names)} tests in the suite build"
    unknown = sorted(set(KNOWN_GAPS) - set(suite_tests()))
    assert not unknown, f"KNOWN_GAPS names tests the suite does not have: {unknown}"
    print("clean under runc:", " ".join(n for n in names if is_clean(baseline.get(n))))
    print("clean under fcrun-oci:", " ".join(n for n in names if is_clean(candidate.get(n))))
    assert {runtime: container_ids(runtime) for runtime in (runc, oci)} == before, "the suite left containers behind"
    assert left_by_the_suite() == [], "the suite left things on the host"
    # Only tests that were selected and that runc passes here count; the rest is printed above for whoever reads it.
    problems = compare(baseline, candidate, KNOWN_GAPS, names)
    details = "\n".join(f"--- {p}\n{tap_failures(oci, p.split(':')[0])}\n{stderr_of(oci, p.split(':')[0])}"
                        if "not under fcrun-oci" in p else f"--- {p}" for p in problems)
    assert not problems, f"{len(problems)} problem(s) against runc (TAP and stderr in {RTVAL_HOME}):\n{details}"
