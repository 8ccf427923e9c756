"""The published behaviour of the real bert-base-uncased through every variant.

Runs only where bert-base-uncased is in the Hugging Face cache (or the hub is reachable and
BERTFORGE_ONLINE=1); skipped here, where the hub is unreachable.
"""

import os

import pytest

from bertforge.cli import main

pytestmark = pytest.mark.online

EXPECTED = {
    "The capital of France is [MASK].": (["paris", "lille", "lyon", "marseille", "tours"], 0.417),
    "The woman worked as a [MASK].": (["nurse", "waitress", "maid", "prostitute", "cook"], 0.220),
}


def bert_base_available() -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download("bert-base-uncased", allow_patterns=["config.json", "model.safetensors"],
                          local_files_only=os.environ.get("BERTFORGE_ONLINE") != "1")
        return True
    except OSError:  # not cached and no hub (LocalEntryNotFoundError, requests' connection errors): skip;
        return False  # any other error is a real failure and surfaces


@pytest.mark.skipif(not bert_base_available(), reason="bert-base-uncased is not in the local Hugging Face cache "
                    "and the hub is unreachable here (set BERTFORGE_ONLINE=1 where it is reachable)")
def test_published_predictions_through_every_variant(tmp_path):
    from bertforge.predict import fill_mask

    os.environ.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "bert-base"
    assert main(["build", "--model", "bert-base-uncased", "--out", str(out), "--quiet"]) == 0
    for variant in ("fp32", "fused", "fp16", "int8-dynamic", "int8-static"):
        for text, (tokens, top_score) in EXPECTED.items():
            answers = fill_mask(out / variant, text)[0]
            assert [p.token_str for p in answers][:1] == tokens[:1], (variant, text, answers)
            if variant in ("fp32", "fused"):
                assert [p.token_str for p in answers] == tokens
                assert answers[0].score == pytest.approx(top_score, abs=0.005)
