"""Step 0 of scripts/device_measure.sh: is the machine ready, and which measurements can it make?

    python scripts/device_measure_check.py --device cuda --embedded_flag FILE --random_model NAME ...

Prints the versions and the GPU, and fails (status 1) when the device is missing, the data (counterfact.json,
the WikiText files for the statistics) are not found, or a random model's tokenizer cannot be read. The
embedded model's weights may be missing (a device machine receives at most 64 MiB; the safetensors copy
is 540 MB): then FILE says ``missing`` and the script skips the benchmark that needs them. Never downloads.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EMBEDDED = "smollm2-135m"


def embedded_weights_ready() -> str:
    """``ready`` when the embedded model loads without the network (its safetensors copy, or its GGUF file and
    the ``gguf`` package to convert it), else why not."""
    from util.model_sources import EMBEDDED_MODELS, embedded_model_dir
    from util.paths import get_paths

    models_dir = get_paths().models_dir
    folder = models_dir / EMBEDDED
    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return "ready"
    gguf_file = models_dir / "gguf" / EMBEDDED_MODELS[EMBEDDED].gguf_file
    if not gguf_file.exists():
        return f"missing: neither {folder}/config.json with its weights nor {gguf_file}"
    if importlib.util.find_spec("gguf") is None:
        return f"missing: {gguf_file} is here but the 'gguf' package that converts it is not"
    embedded_model_dir(EMBEDDED)
    return "ready"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--embedded_flag", type=Path, required=True, help="file to write 'ready' or 'missing: why'")
    parser.add_argument("--random_model", action="append", default=[], help="a random-model name to check")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from dsets.data_files import locate_data_file
    from util.random_models import load_random_tokenizer

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    problems = []
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        print(f"gpu: {properties.name}, {properties.total_memory / 2**30:.1f} GiB")
    elif args.device.startswith("cuda"):
        problems.append(f"--device {args.device} but torch sees no GPU")
    for name in ("counterfact.json", "wikitext/wiki.valid.raw", "wikitext/wiki.test.raw"):
        path = locate_data_file(name)
        print(f"{name}: {path or 'NOT FOUND'}")
        if path is None:
            problems.append(f"{name} not found (set ECE_DATA_DIR, or put the data in data/)")
    embedded = embedded_weights_ready()
    print(f"embedded model {EMBEDDED}: {embedded}")
    args.embedded_flag.write_text(embedded + "\n")
    for model_name in args.random_model:
        try:
            print(f"{model_name}: tokenizer of {len(load_random_tokenizer(model_name))} tokens")
        except Exception as e:  # any reason the tokenizer cannot be read ends the check
            problems.append(f"{model_name}: no tokenizer ({type(e).__name__}: {str(e)[:300]})")
    for problem in problems:
        print(f"NOT READY: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
