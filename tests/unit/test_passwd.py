"""passwd.home_of: HOME as runc sets it for a process whose environment has none."""

import os

from fcrun.runtime.passwd import DEFAULT_HOME, home_of


def test_the_home_of_the_first_entry_with_the_uid(tmp_path):
    path = tmp_path / "passwd"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/sh\n# a comment\nbad line\n"
                     b"app:x:1000:1000::/home/app:/bin/sh\nalias:x:1000:1000::/elsewhere:/bin/sh\nnohome:x:7:7::\n")
    assert home_of(0, bytes(path)) == b"/root"
    assert home_of(1000, bytes(path)) == b"/home/app"
    assert home_of(7, bytes(path)) == DEFAULT_HOME == b"/"  # an empty home
    assert home_of(4242, bytes(path)) == b"/"


def test_no_file_or_not_a_regular_file_is_the_default(tmp_path):
    assert home_of(0, bytes(tmp_path / "missing")) == b"/"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert home_of(0, bytes(fifo)) == b"/"  # never blocks on it
    assert home_of(0, bytes(tmp_path)) == b"/"
