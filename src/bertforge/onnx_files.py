"""One save path for every stage's model.onnx, with ONNX external data when the model is large.

A protobuf message cannot exceed 2 GiB, so a model whose tensors come near that is saved as
model.onnx (the graph) plus model.onnx_data (every tensor over 1 KB, one file): the names optimum's
ORTModelForMaskedLM looks for, which onnx.load and onnxruntime find beside model.onnx by themselves.
Below the threshold a model stays one file, as every loader expects by default.

BERTFORGE_EXTERNAL_DATA_ABOVE (bytes) moves the threshold; the tests set it low to push a tiny
model down the large-model path. The threshold is part of every stage's cache key.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from bertforge.artifact import MODEL_FILE
from bertforge.errors import UsageError
from bertforge.json_files import read_json

MODEL_DATA_FILE = "model.onnx_data"  # optimum's name for model.onnx's external data
# tensors above this many bytes in all go to MODEL_DATA_FILE: under protobuf's 2 GiB, with room for the graph
DEFAULT_EXTERNAL_DATA_ABOVE = 1_800_000_000
EXTERNAL_DATA_ENV = "BERTFORGE_EXTERNAL_DATA_ABOVE"


def external_data_above() -> int:
    raw = os.environ.get(EXTERNAL_DATA_ENV)
    if raw is None or raw == "":
        return DEFAULT_EXTERNAL_DATA_ABOVE
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        from bertforge.errors import UsageError

        raise UsageError(f"{EXTERNAL_DATA_ENV}={raw!r}: give a size in bytes, 0 or more")
    return value


def tensor_bytes(model) -> int:
    """The bytes of the model's initializers (what decides whether it fits one protobuf)."""
    return sum(tensor.ByteSize() for tensor in model.graph.initializer)


def save_model(model, directory: Path) -> bool:
    """Write `model` to directory/model.onnx, with its tensors in model.onnx_data when they are over
    the threshold; returns whether external data was written. With external data, `model` is left
    pointing at the file (onnx moves the tensors out of it): load it again to read its weights."""
    import onnx

    directory = Path(directory)
    ensure_microsoft_opset(model)
    (directory / MODEL_DATA_FILE).unlink(missing_ok=True)  # onnx appends to an existing data file
    external = tensor_bytes(model) > external_data_above()
    onnx.save_model(model, str(directory / MODEL_FILE), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=MODEL_DATA_FILE, size_threshold=1024)
    return external


def default_opset(model) -> int | None:
    """The version of the default (ai.onnx) domain the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def ensure_microsoft_opset(model) -> None:
    """Declare the com.microsoft domain when the graph uses ORT's contrib ops (as ORT's own
    OnnxModel.save does; a graph without the import fails to load)."""
    if any(node.domain == "com.microsoft" for node in model.graph.node):
        import_microsoft_domain(model)


def import_microsoft_domain(model) -> None:
    """The com.microsoft domain (version 1) among the model's opset imports, once."""
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)


def model_files(directory: Path) -> list[Path]:
    """model.onnx and, when there is one, its external data file."""
    directory = Path(directory)
    return [p for p in (directory / MODEL_FILE, directory / MODEL_DATA_FILE) if p.is_file()]


def model_bytes(directory: Path) -> int:
    """The size of a variant's model on disk, its external data counted."""
    return sum(p.stat().st_size for p in model_files(directory))


def uses_external_data(directory: Path) -> bool:
    return (Path(directory) / MODEL_DATA_FILE).is_file()


# Files optimum's ORTModelForMaskedLM and the fill-mask pipeline need beside model.onnx.
LOADER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_loader_files(src: Path, dst: Path) -> None:
    for name in LOADER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a checkpoint's or variant's config.json that bertforge reads, read once and checked."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int | None = None
    type_vocab_size: int | None = None


def model_config(directory: Path) -> ModelConfig:
    """`directory`'s config.json as a ModelConfig; a missing or non-integer field is named (exit 2)."""
    path = Path(directory) / "config.json"
    raw = read_json(path)
    values: dict[str, int | None] = {}
    for field in fields(ModelConfig):
        value = raw.get(field.name)
        required = field.default is MISSING
        if value is None and not required:
            values[field.name] = None
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            values[field.name] = value
        else:
            raise UsageError(f"{path}: {field.name} is {value!r}, not a positive integer")
    return ModelConfig(**values)
