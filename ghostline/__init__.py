"""Ghostline: editor code completion from per-document KV caches kept current as the user types.

The package's parts live in the repository's design folders and are mapped into this namespace by
the build (`pyproject.toml`, `package-dir`): `ghostline.lsp` (the language server), `ghostline.engine`
(documents, caches, decoding), `ghostline.kernels` (RoPE shift, attention, the C step). Those folders
have no `__init__.py` of their own, so running from the repository root never makes `lsp`,
`engine` or `kernels` importable as top-level names that could shadow another distribution's.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ghostline")
except PackageNotFoundError:
    __version__ = "0+unknown"
