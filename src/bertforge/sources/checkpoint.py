"""A local checkpoint directory checked before any work: a BERT config, weights (every shard of an
index present), a tokenizer whose [MASK] is a word of its own vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from bertforge.errors import SourceError, UsageError
from bertforge.json_files import read_json

# one weights file, or an index naming its shards (transformers' save_pretrained with max_shard_size)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
ALTERNATIVES = ("use --model demo (real weights, offline), synthetic:bert-base-uncased (or another "
                "`bertforge resolve --list` names), or a local checkpoint directory")


# what save_pretrained writes that a build reads: a checkpoint bertforge made in its cache (demo's fit, a
# synthetic member) that misses one (a file deleted by hand) is made again
MADE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


def complete(directory: Path) -> bool:
    """Whether a checkpoint bertforge made in its cache still holds every file a build reads."""
    return all((directory / name).is_file() for name in MADE_FILES)


def check_checkpoint(path: Path) -> Path:
    """A directory with a BERT config, weights and a tokenizer, or a one-line SourceError."""
    if not path.exists():
        raise SourceError(f"model path {path} does not exist ({ALTERNATIVES})")
    if not path.is_dir():
        raise SourceError(f"model path {path} is a file; expected a Hugging Face checkpoint directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{path} is not a Hugging Face checkpoint: no config.json")
    try:
        config = read_json(config_path)  # a JSON object, or bad input naming the file
    except UsageError as exc:
        raise SourceError(str(exc)) from None  # a source that does not resolve (hub.py tries the hub then)
    model_type = config.get("model_type")
    if model_type is None:
        raise SourceError(f"{config_path} has no model_type; bertforge exports BERT (model_type 'bert')")
    if model_type != "bert":
        raise SourceError(f"{path} holds a '{model_type}' model; bertforge exports BERT (model_type 'bert')")
    if not has_weights(path):
        raise SourceError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)})")
    check_shards(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    check_mask_token(path)
    return path.resolve()


def has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in WEIGHT_FILES)


def check_shards(path: Path) -> None:
    """A sharded checkpoint's index must name shards that are all there (a partial download otherwise
    fails deep inside transformers)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if not (path / index).is_file():
            continue
        try:
            shards = sorted(set(json.loads((path / index).read_text("utf-8"))["weight_map"].values()))
            if not all(isinstance(shard, str) and shard for shard in shards):
                raise TypeError("its weight_map names something that is no file name")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise SourceError(f"{path / index} is not a weights index: {exc}") from exc
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise SourceError(f"{path}: {index} names {len(shards)} shards and {len(missing)} are missing "
                              f"({', '.join(missing[:3])})")


def check_mask_token(path: Path) -> None:
    """Fill-mask needs a [MASK] token of its own. A BERT tokenizer class names "[MASK]" by default even
    when the vocabulary lacks it, and then maps it to [UNK]'s id: every masked position would ask
    the model about [UNK], and agreement would be measured on the wrong question."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a library's message, kept to one line
        files = [name for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json") if (path / name).exists()]
        named = f" ({', '.join(files)})" if files else ""  # the library's message rarely names the file
        raise SourceError(f"{path}: its tokenizer{named} does not load: {' '.join(str(exc).split())[:300]}") from exc
    mask, mask_id = tokenizer.mask_token, tokenizer.mask_token_id
    if mask is None or mask_id is None:
        raise SourceError(f"{path}: its tokenizer has no mask token; fill-mask needs one (e.g. [MASK])")
    vocab = tokenizer.get_vocab()
    # a special token missing from the vocabulary file is re-added by transformers after it, at an id of
    # its own (len(vocab)) that fits inside the model's rows: then it is an added token, not a word of
    # the vocabulary, and the ids of every word after the missing line have shifted
    if tokenizer.is_fast and mask not in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False):
        raise SourceError(f"{path}: its vocabulary has no entry for its mask token {mask!r} (the tokenizer adds "
                          f"one at id {mask_id}, after the vocabulary, and a line missing from vocab.txt shifts "
                          "the ids after it)")
    if mask not in vocab:
        raise SourceError(f"{path}: its tokenizer's mask token {mask!r} is not in its vocabulary (it would be "
                          f"read as {tokenizer.convert_ids_to_tokens(mask_id)!r})")
    # transformers re-adds a special token missing from the vocabulary at id len(vocab), which can be a
    # real token's id: the model would then read that token's embedding row at every [MASK]
    sharing = sorted(token for token, index in vocab.items() if index == mask_id and token != mask)
    size = json.loads((path / "config.json").read_text("utf-8")).get("vocab_size")
    if sharing or (isinstance(size, int) and mask_id >= size):
        what = f"also the id of {sharing[0]!r}" if sharing else f"outside the model's {size} embedding rows"
        raise SourceError(f"{path}: its tokenizer's mask token {mask!r} has id {mask_id}, {what}: the "
                          "vocabulary lacks its own [MASK] entry")
