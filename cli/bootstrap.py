"""How the launchers' `python3 -S -E` processes load the library, and leave, quickly.

`fcrun` (cli/fcrun: fast.py) and `fcrun-oci` (cli/fcrun-oci: oci_fast.py) start Python without
site: site-packages' .pth files and an editable install's import finder alone cost ~12-15 ms.
When a command needs the library, this module puts on sys.path by hand what site would have:

    pip install .      <site-packages>/fcrun_cli/: <site-packages> on sys.path
    pip install -e .   <project>/cli/: the package fcrun_cli made from <project>/cli,
                       <project>/src (fcrun), then <site-packages> (msgspec)

and then imports msgspec without modules its import loads and a command does not need, and exits
without Python's teardown (each measured below). Built-in modules only, as the thin clients that import it.
"""

import atexit  # built in, as sys
import sys  # no `from __future__ import annotations`: one import more

import posix


def dirname(path: str) -> str:
    return path.rpartition("/")[0] or "/"


def absolute(path: str) -> str:
    """`path` from the working directory (the launcher's may be relative: `./fcrun-oci`), so
    that sys.path does not change meaning if the working directory does."""
    return path if not path or path.startswith("/") else posix.getcwd() + "/" + path


def setup_paths(here: str, site_packages: str) -> None:
    """Make fcrun_cli, fcrun and msgspec importable without site (this module's docstring).

    `here`: the directory of the fcrun_cli modules; `site_packages`: the install's
    site-packages, which the launcher found ("": none found, site is loaded then).
    """
    if here.rpartition("/")[2] == "fcrun_cli":  # pip install .: all in site-packages
        parent = dirname(here)
        if parent not in sys.path:
            sys.path.append(parent)
    elif "fcrun_cli" not in sys.modules:  # pip install -e .: fcrun_cli is the project's cli/
        import _frozen_importlib as frozen  # both are loaded at start-up: no import cost
        import _frozen_importlib_external as external

        spec = external.spec_from_file_location("fcrun_cli", here + "/__init__.py", submodule_search_locations=[here])
        module = frozen.module_from_spec(spec)
        sys.modules["fcrun_cli"] = module
        spec.loader.exec_module(module)
        src = dirname(here) + "/src"
        if src not in sys.path:
            sys.path.append(src)
    if site_packages and site_packages not in sys.path:
        sys.path.append(site_packages)
    elif not site_packages and sys.flags.no_site:  # the source tree's launcher: site finds msgspec
        import site

        site.main()


def import_msgspec() -> None:
    """Import msgspec without what its import loads and a command never uses, then let those
    modules be imported normally again.

    - typing_extensions: msgspec takes get_type_hints/Required/NotRequired from it when it is
      installed (psycopg installs it), and it loads inspect, ast, tokenize: ~7 ms. fcrun's
      structs use none of its types, so typing's own (3.11 has all three) read them the same.
      It is made unimportable for the while.
    - platform: msgspec's core imports uuid (for uuid.UUID), whose import calls
      platform.system() and nothing else of it; platform itself compiles seven regular
      expressions: ~1.7 ms. uuid gets a stand-in that answers system() from os.uname(), as
      platform does on Linux.
    - textwrap: msgspec.json imports its JSON Schema module, which uses textwrap.dedent only
      when a schema is made: ~0.7 ms. It gets a stand-in.
    - msgspec.inspect: msgspec's package imports it (type_info, and the JSON Schema module's
      use of it), defining ~40 Structs: ~0.8 ms. It gets a stand-in too.
    A stand-in imports the real module the first time anything else is read from it, so what
    holds one works as before; sys.modules keeps none (the next `import platform` is real).
    """
    stand_ins = {"typing_extensions": None, "platform": _Deferred("platform", system=_system),
                 "textwrap": _Deferred("textwrap"), "msgspec.inspect": _Deferred("msgspec.inspect")}
    mine = [name for name in stand_ins if name not in sys.modules]  # an embedding process's own stay
    for name in mine:
        sys.modules[name] = stand_ins[name]  # None in sys.modules: its import raises ImportError
    try:
        import msgspec  # noqa: F401
    finally:
        for name in mine:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]


def _system() -> str:
    return posix.uname().sysname  # platform.system() on Linux: uname's system name


class _Deferred(type(sys)):  # a module type, without importing types
    """A module's stand-in: `known` attributes are its own, any other is the real module's
    (imported then, and copied in, so that later reads are plain lookups)."""

    def __init__(self, name: str, **known) -> None:
        super().__init__(name)
        self.__dict__.update(known)

    def __getattr__(self, attribute: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        __import__(self.__name__)
        real = sys.modules[self.__name__]  # __import__ gives a dotted name's top package
        self.__dict__.update(vars(real))
        return getattr(real, attribute)


_exit_code = [1]  # what the process exits with, from exit_with; 1 if it never got one (an uncaught error)


def exit_with(main) -> None:
    """sys.exit(main()), without Python's teardown of the modules main loaded.

    Python's exit would tear down the ~190 modules a container's creation loads, one by one:
    ~15 ms. Exit handlers run last-registered first, so the one registered here, before main
    imports the library (whose handlers stop its spawner and flush logging), runs after them:
    it flushes stdout and stderr and ends the process there. A SystemExit from main (argparse's
    --help and usage errors, which printed their message) gives the code as usual.
    """
    atexit.register(_exit_now)
    try:
        _exit_code[0] = main()
    except SystemExit as exc:
        _exit_code[0] = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, (int, type(None))):
            raise  # a message for Python to print; the code is 1 either way
    sys.exit(_exit_code[0])


def _exit_now() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass  # the reader closed them: nothing to tell it
    import os  # the library has loaded it: free here

    os._exit(_exit_code[0])
