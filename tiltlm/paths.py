"""Is a name the user gave a local path, or a hub id? Decided before anything reaches for the network.

Hugging Face hub ids are ``name`` or ``owner/name``: letters, digits, ``-``, ``_`` and ``.``, at most one
slash, never starting with ``.`` or ``~``, never ending with ``/``. So a name is taken as a local path
(and, when it does not exist, fails at once with "no such file or directory" instead of trying the hub,
which offline means half a minute of retries and then "couldn't connect") when it

* starts with ``/``, ``.`` (``./``, ``../``, a hidden directory) or ``~``, or holds a backslash;
* has more than one slash, or ends with one;
* ends with a file extension the caller names (``.jsonl``, ``.safetensors``...);
* is ``owner/name`` where ``owner`` is an existing local directory: ``model/llama`` typed in a
  directory that has ``model/`` means a path inside it (a hub id with that owner is then reached as
  ``./``-less only from another working directory; the error says so).
"""

from __future__ import annotations

import os


def looks_like_path(name: str, file_types: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is meant as a local path (see the module docstring for the rules)."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or name.lower().endswith(tuple(t.lower() for t in file_types))
            or ("/" in name and os.path.isdir(name.split("/")[0])))


def missing_path_message(name: str) -> str:
    """The one line for a path-like ``name`` that does not exist."""
    where = "" if os.path.isabs(os.path.expanduser(name)) else f" (from {os.getcwd()})"
    return (f"{name}: no such file or directory{where}; a local path was meant, so the hub was not tried "
            f"(hub ids are 'name' or 'owner/name')")
