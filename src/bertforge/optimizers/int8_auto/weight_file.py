"""A base graph's large initializers written once to a file, referenced by every candidate graph.

The int8-auto search opens ~110 sessions over graphs derived from one fp32 graph (each group
quantized alone, then the plans of its bisection). Each derived graph still holds most of the base
graph's fp32 weights (440 MB on bert-base), and serialized into every graph's bytes they were encoded,
parsed and copied again for each session: 2-3 s per whole bert-base graph, against ~0.6 s when they
are read from a file (measured here, same outputs to the bit). So the base graph's large initializers
are written once to `weights.bin` in a scratch folder, and just before a session opens, each of them
still present in a derived graph is replaced by an onnx external-data reference into that file
(onnxruntime resolves it against `session.model_external_initializers_file_folder_path`).

Exact by construction: the graphs the search derives (plans.apply_plan, tied_quant, the
attention repacks, masked_head, prefix.py) only add initializers under new names or remove old
ones, never rewrite one in place, so a base name still in a derived graph still holds the base
data (tests/test_weight_file.py checks it for every scheme). `add` extends the file with a derived
graph's new initializers under the same rule: a name it adds always holds the same data in every
graph that holds it (the all-fp32 plan's packed Q/K/V weights: each the same three base weights
concatenated). A same-named initializer of another shape or type is left in the graph as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

FILE = "weights.bin"
MIN_BYTES = 1 << 16  # smaller initializers stay in the graph's bytes: a reference would save nothing
ALIGN = 4096  # page-aligned offsets, so onnxruntime may map the file instead of copying it
FOLDER_OPTION = "session.model_external_initializers_file_folder_path"


@dataclass
class WeightFile:
    directory: Path
    references: dict[str, onnx.TensorProto] = field(default_factory=dict)  # name -> its reference
    min_bytes: int = MIN_BYTES

    @classmethod
    def write(cls, model: onnx.ModelProto, directory: Path, min_bytes: int = MIN_BYTES) -> WeightFile:
        """Write `model`'s initializers of `min_bytes` or more to `directory`/weights.bin."""
        weights = cls(Path(directory), min_bytes=min_bytes)
        weights.directory.mkdir(parents=True, exist_ok=True)
        (weights.directory / FILE).write_bytes(b"")
        weights.add(model)
        return weights

    def add(self, model: onnx.ModelProto) -> None:
        """Append `model`'s large initializers whose names the file does not hold yet: for a derived graph
        whose new initializers every later graph that holds them holds unchanged (the all-fp32 plan's
        packed Q/K/V weights, sensitivity.fp32_values)."""
        with open(self.directory / FILE, "ab") as out:
            for init in model.graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL or init.name in self.references:
                    continue
                data = init.raw_data  # a copy of the bytes on each access: read once
                if len(data) < max(self.min_bytes, 1):
                    continue
                offset = out.tell()
                padding = -offset % ALIGN
                out.write(b"\0" * padding)
                out.write(data)
                reference = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
                reference.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", FILE), ("offset", offset + padding), ("length", len(data))):
                    entry = reference.external_data.add()
                    entry.key, entry.value = key, str(value)
                self.references[init.name] = reference

    def array(self, init: onnx.TensorProto) -> np.ndarray:
        """An initializer's values, read from the file where `init` is one of its references: what
        plans.apply_plan reads weights with when it is given a graph made by `referencing`."""
        if init.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(init)
        loaded = onnx.TensorProto()
        loaded.CopyFrom(init)  # onnx loads external data into the tensor it is given
        return numpy_helper.to_array(loaded, base_dir=str(self.directory))

    def referencing(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with each written initializer it still holds as a reference into the file
        (cheap: the large initializers are not copied)."""
        light = _copy_except(model, "graph")
        light.graph.CopyFrom(_copy_except(model.graph, "initializer"))
        for init in model.graph.initializer:
            reference = self.references.get(init.name)
            same = reference is not None and reference.dims == init.dims and reference.data_type == init.data_type
            light.graph.initializer.append(reference if same else init)
        return light

    def configure(self, options) -> None:
        """Let a session (its onnxruntime.SessionOptions) resolve the references."""
        options.add_session_config_entry(FOLDER_OPTION, str(self.directory))


def _copy_except(message, skipped: str):
    """A copy of a protobuf message without one of its fields (which a plain copy would duplicate)."""
    copy = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.name == skipped:
            continue
        target = getattr(copy, descriptor.name)
        repeated = (descriptor.is_repeated if hasattr(descriptor, "is_repeated")  # protobuf >= 5.28
                    else descriptor.label == descriptor.LABEL_REPEATED)
        if repeated:
            target.extend(value)
        elif descriptor.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(copy, descriptor.name, value)
    return copy
