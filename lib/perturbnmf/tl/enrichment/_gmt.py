"""Gene-set libraries: GMT files, mappings, and Enrichr libraries by name.

:func:`read_gmt` reads a GMT file.  :func:`load_library` reads a GMT path, cleans a mapping
{term: genes}, or fetches an Enrichr library by name -- the only function of the enrichment
tools that may use the network, and it fails with a clear message
(:class:`~perturbnmf.errors.LibraryUnavailableError`) when Enrichr is unreachable.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

from ...errors import LibraryUnavailableError

__all__ = ["read_gmt", "load_library", "LibraryUnavailableError"]


# --------------------------------------------------------------------------- #
# GMT
# --------------------------------------------------------------------------- #
def read_gmt(path) -> dict[str, list[str]]:
    """Read a GMT gene-set file.

    Each non-blank line is ``name <TAB> description <TAB> gene1 <TAB> gene2 ...``.
    The description may be empty (Enrichr's GMTs: ``name\\t\\tGENE1\\tGENE2``).
    Fields are stripped of surrounding whitespace, empty gene fields are
    dropped, and duplicate genes within a set are removed (first occurrence
    kept).

    Parameters
    ----------
    path : str or os.PathLike
        The GMT file (UTF-8; a byte-order mark is ignored).

    Returns
    -------
    dict[str, list[str]]
        Set name -> genes, in file order.

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message names it).
    ValueError
        A line with fewer than 3 tab-separated fields, an empty set name, a set
        without genes, a set name used twice, or no sets at all.  Messages name
        the file and the 1-based line number.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GMT file not found: {path!r}")
    sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            name, genes = _parse_gmt_line(path, lineno, line)
            if name in sets:
                raise ValueError(
                    f"{path}, line {lineno}: duplicate gene-set name {name!r} "
                    f"(first defined on line {first_line[name]})"
                )
            sets[name] = genes
            first_line[name] = lineno
    if not sets:
        raise ValueError(f"{path}: no gene sets found (the file is empty or has only blank lines)")
    return sets


def _parse_gmt_line(path: str, lineno: int, line: str) -> tuple[str, list[str]]:
    """The set name and its unique genes on one non-blank GMT line."""
    fields = [f.strip() for f in line.split("\t")]
    # trailing tabs only create empty gene fields; ignore them here
    while len(fields) > 3 and fields[-1] == "":
        fields.pop()
    if len(fields) < 3:
        hint = " (is the file tab-separated?)" if len(fields) == 1 and " " in line.strip() else ""
        raise ValueError(
            f"{path}, line {lineno}: expected 'name<TAB>description<TAB>gene1<TAB>...' "
            f"(at least 3 tab-separated fields), found {len(fields)}{hint}"
        )
    name = fields[0]
    if not name:
        raise ValueError(f"{path}, line {lineno}: empty gene-set name")
    genes = list(dict.fromkeys(g for g in fields[2:] if g))
    if not genes:
        raise ValueError(f"{path}, line {lineno}: gene set {name!r} has no genes")
    return name, genes


# --------------------------------------------------------------------------- #
# Enrichr, through gseapy
# --------------------------------------------------------------------------- #
class _TimeoutSession:
    """Stand-in for gseapy's ``requests`` session: one try, a short timeout.

    gseapy's own session retries five times with back-off and downloads with
    ``timeout=None``, which makes an offline machine hang; here every request
    gets ``timeout`` seconds and is not retried.
    """

    def __init__(self, timeout: float):
        import requests

        self._session = requests.Session()
        self._timeout = timeout

    def get(self, url, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return self._session.get(url, **kwargs)


_OFFLINE_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.timeout, socket.gaierror)


def _offline_errors() -> tuple[type[BaseException], ...]:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with gseapy
        return _OFFLINE_ERRORS
    return _OFFLINE_ERRORS + (requests.exceptions.ConnectionError, requests.exceptions.Timeout)


def _fetch_enrichr_library(name: str, organism: str, timeout: float) -> dict[str, list[str]]:
    """Download an Enrichr library with gseapy (``EnrichrAPI.download_libraries``)."""
    from gseapy.enrichr import EnrichrAPI

    api = EnrichrAPI(organism)
    api._session = _TimeoutSession(timeout)
    return api.download_libraries(name)


def _enrichr_cache_dir() -> str:
    import gseapy.enrichr  # noqa: F401  (the submodule; ``gseapy.enrichr`` the attribute is a function)

    return sys.modules["gseapy.enrichr"].DEFAULT_CACHE_PATH


def _clean_library(sets: Mapping, source: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for term, genes in sets.items():
        if isinstance(genes, str):
            raise ValueError(f"{source}: term {term!r}: genes must be a list, not a string")
        genes = list(dict.fromkeys(str(g).strip() for g in genes if str(g).strip()))
        if genes:
            out[str(term)] = genes
    if not out:
        raise ValueError(f"{source}: no gene sets (the library is empty)")
    return out


def _unavailable_error(name: str, organism: str, timeout: float, exc: BaseException) -> LibraryUnavailableError:
    """The error for an Enrichr that cannot be reached: what failed, and how to work offline."""
    detail = f"{type(exc).__name__}: {exc}"
    if len(detail) > 200:
        detail = detail[:199] + "\u2026"
    return LibraryUnavailableError(
        f"Gene-set library {name!r} is not a local file, and fetching it from Enrichr "
        f"(https://maayanlab.cloud/Enrichr, organism {organism!r}) failed because Enrichr is unreachable "
        f"({detail}; time-out {timeout:g} s): this machine is probably offline. Download the library as a "
        f"GMT file on a machine with internet access (Enrichr > Libraries > {name}, or "
        f"gseapy.get_library({name!r}, save='{name}.gmt')), copy it here and pass its path instead of the "
        f"name, e.g. load_library('/path/to/{name}.gmt')."
    )


def _load_enrichr_library(name: str, organism: str, timeout: float, use_cache: bool) -> dict[str, list[str]]:
    """An Enrichr library by name: gseapy's download cache when allowed and present, else Enrichr."""
    cached = os.path.join(_enrichr_cache_dir(), f"Enrichr.{name}.gmt")
    if use_cache and os.path.isfile(cached):
        return read_gmt(cached)
    try:
        sets = _fetch_enrichr_library(name, organism, float(timeout))
    except _offline_errors() as exc:
        raise _unavailable_error(name, organism, timeout, exc) from exc
    except Exception as exc:
        if type(exc) is not Exception:  # gseapy raises a bare Exception for a non-OK answer
            raise
        raise ValueError(
            f"Enrichr did not return a gene-set library named {name!r} for organism {organism!r} ({exc}). "
            "Check the name at https://maayanlab.cloud/Enrichr/#libraries, or pass the path of a .gmt file."
        ) from exc
    if not sets:
        raise ValueError(
            f"Enrichr returned no gene sets for {name!r} (organism {organism!r}); check the library name at "
            "https://maayanlab.cloud/Enrichr/#libraries, or pass the path of a .gmt file."
        )
    return _clean_library(sets, f"Enrichr library {name!r}")


def load_library(
    spec, *, organism: str = "human", timeout: float = 10.0, use_cache: bool = True
) -> dict[str, list[str]]:
    """A gene-set library from a GMT path, or from Enrichr by name.

    Parameters
    ----------
    spec : str, os.PathLike or mapping {term: genes}
        * an existing file: read with :func:`read_gmt` (no network), whatever
          its name -- also when it looks like an Enrichr name;
        * a mapping: returned as a ``dict`` of lists (genes stripped,
          duplicates and empty terms dropped);
        * a string ending in ``.gmt`` or containing a path separator that is
          not a file: ``FileNotFoundError`` (never sent to Enrichr);
        * any other string, e.g. ``"GO_Biological_Process_2023"``: an Enrichr
          library name.  gseapy's download cache
          (``~/.cache/gseapy/Enrichr.<name>.gmt``) is read when present and
          ``use_cache``; otherwise the library is downloaded from Enrichr with
          gseapy (``EnrichrAPI.download_libraries``, one try, ``timeout``
          seconds), which also writes that cache file.
    organism : str, default "human"
        Enrichr instance for names (gseapy's names: human/mouse -> Enrichr,
        fly, yeast, worm, fish).
    timeout : float, default 10
        Seconds to wait for Enrichr (connect and each read).
    use_cache : bool, default True
        Read a previously downloaded copy from gseapy's cache.

    Returns
    -------
    dict[str, list[str]]
        Term -> genes.

    Raises
    ------
    LibraryUnavailableError
        (a ``ValueError``) ``spec`` is a name and Enrichr cannot be reached
        (connection error, DNS failure or time-out): the message names the
        library and says to download the GMT and pass its path.
    ValueError
        Enrichr answered but returned no such library, bad ``timeout``, or a
        malformed GMT file / mapping.
    FileNotFoundError
        ``spec`` looks like a path (``.gmt`` suffix or a separator) but is not
        a file.
    """
    if isinstance(spec, Mapping):
        return _clean_library(spec, "library mapping")
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            f"spec must be a path to a .gmt file, an Enrichr library name or a mapping {{term: genes}}, got {spec!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    path = os.fspath(spec)
    if os.path.isfile(path):
        return read_gmt(path)
    if isinstance(spec, os.PathLike) or path.lower().endswith(".gmt") or os.sep in path or "/" in path:
        raise FileNotFoundError(f"GMT file not found: {path!r}")
    name = path.strip()
    if not name:
        raise ValueError("spec is an empty string; give a .gmt path or an Enrichr library name")
    return _load_enrichr_library(name, organism, timeout, use_cache)
