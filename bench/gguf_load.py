"""Loading a GGUF model: from the GGUF file each time, against the converted copy mapd keeps (docs/formats.md):

    python bench/gguf_load.py                                          # both models of the embedded default
    python bench/gguf_load.py --model embedded:smollm2-135m-instruct --dtype auto

For each model, in a fresh cache folder: seconds to load (model and tokenizer) from the GGUF file as
transformers reads it, seconds to convert it once (mapd.models.servable, in the type it is loaded in), seconds
to load it again (mapd.generation.load_model, which reads the copy), and the copy's size on disk.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DEFAULT_MODELS = [("embedded:smollm2-135m-instruct", "auto"), ("embedded:qwen2.5-coder-0.5b-instruct", "bfloat16")]


def measure(model: str, dtype: str) -> None:
    """Print the three timings and the copy's size for one model (the cache folder is $MAPD_CACHE_DIR)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mapd.generation import load_model
    from mapd.models import resolve_model, servable

    folder, gguf_file = resolve_model(model)  # an embedded model in parts is assembled here, outside the timings
    torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    began = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch_dtype)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    from_gguf = time.perf_counter() - began
    began = time.perf_counter()
    copy = Path(servable(model, gguf_file, dtype=None if dtype == "auto" else dtype))
    converted = time.perf_counter() - began
    began = time.perf_counter()
    load_model(model, dtype=dtype)
    from_copy = time.perf_counter() - began
    size = sum(path.stat().st_size for path in copy.rglob("*") if path.is_file())
    print(f"{model} ({dtype}): load from the GGUF file {from_gguf:.1f} s; convert once {converted:.1f} s; "
          f"load the copy {from_copy:.2f} s ({from_gguf / from_copy:.0f}x faster); copy {size / 1e6:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="one model (default: both models of the embedded default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16"])
    args = parser.parse_args()
    models = [(args.model, args.dtype)] if args.model else DEFAULT_MODELS
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MAPD_CACHE_DIR"] = cache  # a fresh cache: the conversion is really made
        for model, dtype in models:
            measure(model, dtype)


if __name__ == "__main__":
    main()
