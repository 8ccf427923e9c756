"""Export stage: a Hugging Face BERT checkpoint directory -> model.onnx + config + tokenizer.

Through optimum's exporter (task fill-mask, dynamic batch and sequence axes). Three traps handled:
- attention is loaded as eager: SDPA exports a graph ORT's attention fusion skips (ORT PR #22629);
- the MLM decoder is tied to the word embeddings: optimum stores it once (Gather + Transpose->MatMul)
  when accelerate is installed (it is a dependency); we check that it did;
- optimum traces with token_type_ids drawn from {0, 1} whatever the model's type_vocab_size: a BERT
  with a single token type crashed the trace (index out of range), so the export passes optimum's own
  BERT config with a dummy-input generator that stays within type_vocab_size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

from bertforge.artifact import MODEL_FILE
from bertforge.errors import SourceError, StageError
from bertforge.exporter.config import ExportConfig
from bertforge.json_files import read_json
from bertforge.onnx_files import external_data_above, model_bytes, save_model, uses_external_data
from bertforge.optimizers.tied_quant import tied_table

NAME = "export"
VERSION = "1"


# Weights a BERT checkpoint may hold that BertForMaskedLM has no place for: the pooler and the
# next-sentence head (bert-base-uncased's own checkpoint has both). Any other unused weight means the
# checkpoint and its config.json disagree.
OTHER_HEADS = ("bert.pooler.", "cls.seq_relationship.")


def load_reference(checkpoint: Path):
    """The PyTorch reference exactly as exported: BertForMaskedLM, fp32, eager attention, eval mode.

    Weights config.json's model needs but the checkpoint lacks (transformers would initialise them at
    random and say so only in a log line), weights it has no place for, and weights that do not load
    are a one-line SourceError naming them. The MLM head is the documented exception: a checkpoint
    without one (an encoder) gets the missing head reported as data, and seeded (seeded_head)."""
    from transformers import BertForMaskedLM

    from bertforge.crash_log import transformers_errors_only

    try:
        with transformers_errors_only():  # the missing-head warning is reported by us, as data
            model, info = BertForMaskedLM.from_pretrained(checkpoint, attn_implementation="eager",
                                                          output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - truncated files, shapes that do not fit config.json, ...
        raise SourceError(f"{checkpoint}: its weights do not load: {' '.join(str(exc).split())[:300]}") from exc
    missing_head = sorted(k for k in info["missing_keys"] if k.startswith("cls."))
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("cls."))
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(OTHER_HEADS))
    if missing:
        raise SourceError(f"{checkpoint}: config.json's model needs {len(missing)} weights the checkpoint lacks "
                          f"(they would be random): {_some(missing)}")
    if unexpected:
        raise SourceError(f"{checkpoint}: {len(unexpected)} weights in the checkpoint have no place in config.json's "
                          f"model: {_some(unexpected)}")
    if missing_head:
        seeded_head(model, missing_head)
    return model.eval(), missing_head


def seeded_head(model: Any, missing: list[str]) -> None:
    """Give the head weights the checkpoint lacks seeded values. transformers draws them at random on
    every load, and the weights check, the export and each validation reference are separate loads: the
    exported head and the reference's differed, and fp32 failed its parity gate on an encoder that had
    exported exactly. Linear weights ~ N(0, initializer_range), LayerNorm weights 1, biases 0, as
    BERT's own initialisation; the word embeddings the decoder shares are never touched."""
    import torch

    parameters = dict(model.named_parameters(remove_duplicate=False))
    shared = model.get_input_embeddings().weight
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name in missing:
            parameter = parameters.get(name)
            if parameter is None or parameter is shared:
                continue
            if name.endswith("LayerNorm.weight"):
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, model.config.initializer_range)


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_dimensions(checkpoint: Path) -> None:
    """config.json's sizes against the safetensors headers (names and shapes only, no weights read),
    before any model is built: a config asking for 100,000 layers over a checkpoint of 2 had
    transformers allocate them all (7.4 GB and counting) before noticing the missing weights."""
    import re

    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        return  # pytorch_model.bin: its header is a pickle, read only by loading it
    config = read_json(checkpoint / "config.json")
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as handle:
                shapes.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})
        except Exception as exc:  # noqa: BLE001 - a truncated or damaged file: the library's words, one line
            raise SourceError(f"{checkpoint}: its weights do not load: {path.name}: "
                              f"{' '.join(str(exc).split())[:200]}") from exc
    layers = {int(m.group(1)) for name in shapes if (m := re.search(r"encoder\.layer\.(\d+)\.", name))}
    wanted = config.get("num_hidden_layers")
    # only a whole run of layers 0..n-1 says how many the weights hold; stray keys are the full load's to name
    if isinstance(wanted, int) and layers == set(range(len(layers))) and wanted != len(layers):
        raise SourceError(f"{checkpoint}: config.json's num_hidden_layers is {wanted}, its weights hold "
                          f"{len(layers)} layers (layer.{min(wanted, len(layers))}. would be "
                          f"{'random' if wanted > len(layers) else 'left out'})")
    embeddings = next((shape for name, shape in shapes.items() if name.endswith("word_embeddings.weight")), None)
    size = [config.get("vocab_size"), config.get("hidden_size")]
    if embeddings is not None and all(isinstance(v, int) for v in size) and embeddings != size:
        raise SourceError(f"{checkpoint}: config.json's vocab_size x hidden_size is {size[0]} x {size[1]}, its "
                          f"word embeddings are {embeddings[0]} x {embeddings[1]}")


def check_weights(checkpoint: Path) -> None:
    """load_reference's checks, before any stage runs (the model is loaded and released), after the
    sizes are checked against the weight files' headers."""
    from bertforge.memory import release_freed_memory

    check_dimensions(checkpoint)
    model, _ = load_reference(checkpoint)
    del model
    release_freed_memory()


def bert_onnx_config(model_config):
    """optimum's BertOnnxConfig for fill-mask, its dummy token_type_ids within the model's type_vocab_size
    (optimum's DummyTextInputGenerator hard-codes 2 token types)."""
    from optimum.exporters.onnx.model_configs import BertOnnxConfig
    from optimum.utils.input_generators import DummyTextInputGenerator

    token_types = max(1, int(getattr(model_config, "type_vocab_size", 2) or 1))

    class TokenTypeSafeGenerator(DummyTextInputGenerator):
        def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64",
                     float_dtype: str = "fp32"):
            if input_name == "token_type_ids":
                return self.random_int_tensor([self.batch_size, self.sequence_length], max_value=token_types,
                                              min_value=0, framework=framework, dtype=int_dtype)
            return super().generate(input_name, framework, int_dtype, float_dtype)

    class Config(BertOnnxConfig):
        DUMMY_INPUT_GENERATOR_CLASSES = (TokenTypeSafeGenerator,)

    return Config(model_config, task="fill-mask")


def run(checkpoint: Path, out: Path, config: ExportConfig) -> dict[str, Any]:
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoTokenizer

    model, missing_head = load_reference(checkpoint)
    if not getattr(model.config, "tie_word_embeddings", True):
        raise SourceError(f"{checkpoint}: its MLM decoder is not tied to the word embeddings (config.json: "
                          "tie_word_embeddings false); bertforge builds tied BERT masked LMs, as every checkpoint "
                          "on bert-base-uncased's card is (its int8 stages share one table)")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    logging.getLogger("optimum").setLevel(logging.ERROR)
    onnx_export_from_model(model, out, task="fill-mask", opset=config.opset, do_validation=False,
                           preprocessors=[tokenizer], custom_onnx_configs={"model": bert_onnx_config(model.config)})
    model_path = out / MODEL_FILE
    if (model_bytes(out) > external_data_above()) != uses_external_data(out):
        # optimum's exporter splits off external data only past protobuf's limit; the rest of the pipeline
        # follows onnx_files' threshold, so the export is written again where the two disagree
        save_model(onnx.load(str(model_path)), out)
    onnx.checker.check_model(str(model_path))  # by path: it reads external data the way loaders do
    proto = onnx.load(str(model_path), load_external_data=False)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    # the tie holds when the decoder reads, through a Transpose, the very table the embeddings' Gather
    # reads; counting initializers of the table's shape also counted any other weight of that shape
    initializers = {i.name: list(i.dims) for i in proto.graph.initializer}
    vocab_tables = sorted({n.input[0] for n in proto.graph.node if n.op_type == "Gather"
                           and initializers.get(n.input[0]) == [vocab, hidden]})
    tied = tied_table(proto.graph)
    if len(vocab_tables) != 1 or tied is None or tied[0] != vocab_tables[0]:
        raise StageError(f"export stored the {vocab}x{hidden} word embeddings apart from the MLM decoder's "
                         "weights (tied-weight dedup failed; is accelerate installed?)")
    return {
        "opset": config.opset,
        "ir_version": proto.ir_version,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "num_layers": model.config.num_hidden_layers,
        "num_heads": model.config.num_attention_heads,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "attn_implementation": model.config._attn_implementation,
        "tied_embedding_copies": len(vocab_tables),
        "mlm_head_missing_from_checkpoint": missing_head,
        "model_bytes": model_bytes(out),
    }
