# sglang/__init__.py of the sglang-overlay fork wheel. Fork-only: the build backend
# (scripts/overlay_tool/build_backend.py, install_light_init) writes it into the wheel, never into
# patches/ or export-pr's branches. Upstream's own __init__.py is sglang/_upstream_init.py, byte for
# byte, and runs here, in this module's namespace: with sglang's runtime installed, `import sglang`
# has upstream's names, side effects and errors (this wrapper leaves no name behind).
#
# One difference, when a third-party package upstream's __init__ imports is not installed (the
# fork wheel installed with `pip install --no-deps` on a bare Python): `import sglang` succeeds
# instead of raising, so that `python -m sglang.overlay` and `sglang.overlay.__version__`, which
# need only the standard library, work. sglang.__version__ is set, and the first use of any other
# name upstream's __init__ defines raises the original ModuleNotFoundError, saying what to install.
# sglang._overlay_runtime_error holds that error (absent when the runtime imported).


def _sglang_overlay_run_upstream_init(namespace):
    import os
    from importlib.machinery import SourceFileLoader

    path = os.path.join(os.path.dirname(namespace["__file__"]), "_upstream_init.py")
    code = SourceFileLoader(namespace["__name__"], path).get_code(namespace["__name__"])
    try:
        exec(code, namespace)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.partition(".")[0] == namespace["__name__"]:
            raise  # sglang's own module is missing: a broken install, raised as upstream raises it
        _sglang_overlay_defer(namespace, path, exc)  # noqa: F821 (defined below; both are deleted at the end)


def _sglang_overlay_defer(namespace, path, error):
    """Light mode: upstream's names raise ``error`` (with what to install) when first used."""
    import ast
    import os

    from sglang.version import __version__

    namespace["__version__"] = __version__
    namespace["_overlay_runtime_error"] = error
    package = os.path.dirname(path)

    def upstream_names():
        """The names upstream's __init__ binds at module level, and its __all__."""
        with open(path, encoding="utf-8") as f:
            body = list(ast.parse(f.read()).body)
        names = set()
        while body:
            node = body.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).partition(".")[0] for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                    names.update(
                        c.value
                        for c in ast.walk(node.value)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str)
                    )
            else:  # if / try / with blocks at module level
                for field in ("body", "orelse", "finalbody", "handlers"):
                    body.extend(getattr(node, field, []))
        return names

    def __getattr__(name):
        is_submodule = os.path.isdir(os.path.join(package, name)) or os.path.isfile(os.path.join(package, name + ".py"))
        if name.startswith("__") or is_submodule or name not in upstream_names():
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        raise ModuleNotFoundError(
            f"sglang.{name} needs sglang's runtime, which is not installed here: upstream's "
            f"sglang/__init__.py stopped at {error} (sglang {__version__}). Install the fork with its "
            "dependencies: `pip install .` in the sglang-overlay checkout (GPU machines), or "
            "`python3 scripts/overlay.py venv " + __version__ + " DIR` there (CPU); `python -m "
            "sglang.overlay` says whether the runtime imports.",
            name=error.name,
        ) from error

    namespace["__getattr__"] = __getattr__


_sglang_overlay_run_upstream_init(globals())
del _sglang_overlay_run_upstream_init, _sglang_overlay_defer
