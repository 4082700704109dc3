"""bioimage.io model packages (spec 0.5) as models of the runtime: ``embedseg-run predict model.zip``.

A package made by ``embedseg-export bioimageio`` is a zip of ``rdf.yaml``, the ONNX weights (our model
contract in their metadata, as in every exported model), test tensors, a cover and documentation; the
contract also sits in ``config.embedseg`` of the ``rdf.yaml``, so the clustering settings travel with the
package wherever it goes. The runtime reads only what it needs, without torch or ``bioimageio.spec``:
the description's ``format_version``, ``type``, ``weights`` and ``config``, and it runs the ONNX weights
through the ordinary ONNX backends, so a package gives exactly the labels of the ONNX file it came from.

The weights are extracted once into a cache folder named by the package's sha256 (atomically: a folder
appears complete or not at all), so the runtime's model hash, and resume, are those of the ONNX file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .contract import Contract, ContractError
from .io import sha256_file

PACKAGE_SUFFIXES = (".zip",)
DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml")
SPEC_MAJOR = "0.5"
CONFIG_KEY = "embedseg"
CACHE_ENV = "EMBEDSEG_PACKAGE_CACHE"


class PackageError(ValueError):
    """A file is not a usable bioimage.io EmbedSeg package; the message names the file and what is wrong."""


def is_package(path: str | os.PathLike) -> bool:
    """True for a ``.zip`` file name (a bioimage.io package is a zip)."""
    return Path(path).suffix.lower() in PACKAGE_SUFFIXES


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "embedseg-deploy" / "packages"


def _description_name(names: list[str]) -> str | None:
    top = [n for n in names if "/" not in n.strip("/")]
    for wanted in DESCRIPTION_NAMES:
        if wanted in top:
            return wanted
    return next((n for n in top if n.endswith(".bioimageio.yaml")), None)


def _load_yaml(text: str, where: str) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PackageError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise PackageError(f"{where}: the description is not a YAML mapping")
    return doc


def read_description(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """The package's description (``rdf.yaml``) and the names of its files."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{path}: model package not found")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            name = _description_name(names)
            if name is None:
                raise PackageError(
                    f"{path}: a zip without rdf.yaml or bioimageio.yaml is not a bioimage.io model package"
                )
            text = zf.read(name).decode("utf-8", "replace")
    except zipfile.BadZipFile as exc:
        raise PackageError(
            f"{path}: not a readable zip file ({exc}); the package is broken or truncated"
        ) from None
    except OSError as exc:
        raise PackageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _load_yaml(text, f"{path}:{name}"), names


def check_description(doc: dict[str, Any], where: str) -> tuple[str, Contract]:
    """The ONNX weights' file name and our contract, or a PackageError saying what is missing."""
    version = str(doc.get("format_version", "?"))
    if doc.get("type") not in (None, "model"):
        raise PackageError(f"{where}: a bioimage.io {doc.get('type')!r}, not a model")
    if not version.startswith(SPEC_MAJOR + "."):
        raise PackageError(
            f"{where}: bioimage.io spec version {version}; embedseg-run reads model packages of spec "
            f"{SPEC_MAJOR} (re-export with embedseg-export bioimageio, or update the package with "
            "bioimageio.spec)"
        )
    weights = doc.get("weights") or {}
    onnx = weights.get("onnx") if isinstance(weights, dict) else None
    if not isinstance(onnx, dict) or not onnx.get("source"):
        formats = ", ".join(sorted(weights)) if isinstance(weights, dict) and weights else "none"
        raise PackageError(
            f"{where}: the package has no ONNX weights (it has: {formats}); embedseg-run runs ONNX weights "
            "(export the model with embedseg-export onnx, then embedseg-export bioimageio)"
        )
    config = (doc.get("config") or {}).get(CONFIG_KEY) if isinstance(doc.get("config"), dict) else None
    if not isinstance(config, dict) or "contract" not in config:
        raise PackageError(
            f"{where}: not an EmbedSeg model package: its config has no '{CONFIG_KEY}.contract' (the model "
            "contract: spacing, normalisation, clustering thresholds); export it with embedseg-export "
            "bioimageio"
        )
    try:
        contract = Contract.from_dict(config["contract"])
    except (ContractError, TypeError) as exc:
        raise PackageError(f"{where}: bad EmbedSeg contract in config.{CONFIG_KEY}: {exc}") from None
    return str(onnx["source"]), contract


def extract_onnx(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The package's ONNX weights as a file in the cache (extracted once per package), checked first.

    The ONNX file carries the contract in its metadata; for weights without it, the package's contract
    is written beside them (``model.onnx.json``), where the ONNX backends look.
    """
    path = Path(path)
    doc, names = read_description(path)
    source, contract = check_description(doc, str(path))
    if source not in names:
        raise PackageError(f"{path}: the ONNX weights {source!r} named in the description are not in the zip")
    root = Path(cache) if cache is not None else default_cache_dir()
    folder = root / sha256_file(path)[:32]
    onnx = folder / Path(source).name
    if onnx.is_file():
        return onnx
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with zipfile.ZipFile(path) as zf, zf.open(source) as src, open(tmp / onnx.name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        (tmp / f"{onnx.name}.json").write_text(contract.to_json())  # read only where the ONNX lacks one
        try:
            os.replace(tmp, folder)
        except OSError:  # another process extracted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackageError(f"{path}: cannot extract {source}: {exc}") from None
    return onnx
