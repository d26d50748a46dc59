"""sglang-overlay's tool: keep a small patch set and new files on top of upstream SGLang releases.

``scripts/overlay.py`` is the command line (``overlay_tool.cli``). The modules, leaves first
(no module imports one that comes after it in this list):

- ``errors``: OverlayError (exit 1), UnsupportedRelease and NotOnCPU (exit 2);
- ``gitutil``: running commands and git, byte helpers (project-agnostic);
- ``locks``: one builder per cache entry (a flock beside it), atomic writes (project-agnostic);
- ``releases``: patches/releases.toml: Release, Variant, Overlay, version_key;
- ``cache``: upstream release wheels and release trees (git repositories tagged vX), what fetching costs;
- ``apply``: Target, FilePlan; apply, revert, status;
- ``patches``: checkout, refresh (export_patches), check;
- ``envs``: CPU venvs: per release, the shared base venv and its transformers layers (``venv_entry``: one
  builder at a time); patched trees, the demo;
- ``lint``: ruff over the project's own code, in a cached venv;
- ``matrix``: the release matrix, PyPI's newest release, the table;
- ``export_changes`` / ``export_opt_fixes`` / ``export_check`` / ``export_pr``: the upstream PR branches
  (upstream layer only) and upstream's own checks on them;
- ``build_backend``: the PEP 517 backend of the fork wheel (pyproject.toml);
- ``cli``: argparse verbs and exit codes.

Importing any of them does no work (no network, no files written, nothing run).
"""
