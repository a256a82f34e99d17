"""docroot.py's rules, on plain directories (no mounts: tests/security/test_docroot_security.py
mounts them into containers)."""

from __future__ import annotations

import os

import pytest

from fcrun.docroot import DEFAULT_DOCROOT_ROOTS, check_docroot, check_roots, open_docroot
from fcrun.errors import SpecError


@pytest.fixture
def root(tmp_path):
    (tmp_path / "sites" / "a" / "www").mkdir(parents=True)
    return tmp_path / "sites"


def test_a_directory_under_a_root_is_opened_and_normalised(root):
    fd = open_docroot(str(root / "a" / "www"), [str(root)])
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(root / "a" / "www"))
    finally:
        os.close(fd)
    assert check_docroot(f"{root}//a/./www/../www/", [str(root)]) == str(root / "a" / "www")


def test_a_root_reached_through_a_symlink_is_the_administrators_choice(root, tmp_path):
    (tmp_path / "www").symlink_to(root)  # /var/www -> /data/www, say
    assert check_docroot(str(tmp_path / "www" / "a"), [str(tmp_path / "www")]) == str(tmp_path / "www" / "a")
    assert check_docroot(str(root / "a"), [str(tmp_path / "www")]) == str(root / "a")  # by its real path too


@pytest.mark.parametrize("docroot,words", [
    ("relative/www", "not an absolute path"),
    ("/", "outside the allowed docroot roots"),
    ("/etc", "outside the allowed docroot roots"),
    ("{root}", "a docroot root itself"),
    ("{root}/a/../..", "outside the allowed docroot roots"),
    ("{root}/missing", "does not exist"),
    ("{root}/a/www/file", "not a directory"),
    ("{root}/link", "symlink"),
    ("{root}/linked/www", "symlink"),
    ("{root}/a/www/up", "symlink"),
])
def test_refused(root, docroot, words):
    (root / "a" / "www" / "file").write_text("x")
    (root / "link").symlink_to("/etc")
    (root / "linked").symlink_to(root / "a")
    (root / "a" / "www" / "up").symlink_to("..")
    with pytest.raises(SpecError, match=words) as info:
        check_docroot(docroot.format(root=root), [str(root)], where="docroot")
    assert info.value.where == "docroot"


def test_the_message_names_the_path_and_the_allowed_roots():
    with pytest.raises(SpecError) as info:
        check_docroot("/etc/ssl", DEFAULT_DOCROOT_ROOTS)
    assert str(info.value) == "docroot /etc/ssl is outside the allowed docroot roots (/srv, /var/www) (at docroot)"


def test_fcrun_state_is_neither_a_docroot_nor_inside_one(root):
    run_root = root / "a" / "run"
    run_root.mkdir()
    (run_root / "containers").mkdir()
    for docroot, words in [(run_root, "is or lies in fcrun's own"), (run_root / "containers", "is or lies in"),
                           (root / "a", f"is or holds fcrun's own {run_root}")]:
        with pytest.raises(SpecError, match=words):
            check_docroot(str(docroot), [str(root)], forbidden=[str(run_root), "/nonexistent/data"])
    assert check_docroot(str(root / "a" / "www"), [str(root)], forbidden=[str(run_root)])


def test_a_docroot_may_not_hold_another_root(root):
    with pytest.raises(SpecError, match="holds the docroot root"):
        check_docroot(str(root / "a"), [str(root), str(root / "a" / "www")])


def test_roots_must_be_absolute_normalised_and_not_slash():
    check_roots(["/srv", "/var/www"])
    for roots, words in [(["srv"], "not a normalised absolute path"), (["/srv/"], "not a normalised"),
                         (["/srv", "/"], 'docroot root "/"')]:
        with pytest.raises(SpecError, match=words):
            check_roots(roots)
