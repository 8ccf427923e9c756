"""What bertforge reads back is checked, and what it writes stays where it belongs (issue "Trust, round
2"): each test here failed on 024f178."""

import json
import os
import shutil

import numpy as np
import pytest

from bertforge.cli import main


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own: its results files are the ones this test's builds wrote."""
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def small_recipe(tmp_path, tiny_checkpoint):
    path = tmp_path / "small.yaml"
    path.write_text(f"model: {tiny_checkpoint}\nvariants: [fp32, int8-dynamic]\nbench: {{enabled: false}}\n"
                    "validation: {max_sentences: 20}\n")
    return path


def build(recipe, out, *extra) -> int:
    return main(["build", "--recipe", str(recipe), "--out", str(out), "--quiet", *extra])


def test_validate_writes_through_no_variant_link_when_build_json_lists_none(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "fp32", elsewhere)
    (out / "fp32").symlink_to(elsewhere, target_is_directory=True)
    marker = json.loads((out / "build.json").read_text())
    marker["variants"] = []
    (out / "build.json").write_text(json.dumps(marker))
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    capsys.readouterr()
    assert main(["validate", str(out), "--quiet"]) == 2
    assert f"{out / 'fp32'} is a symbolic link or lies outside {out}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before


def test_verify_opens_no_file_a_manifest_names_outside_its_directory(tmp_path):
    from bertforge.artifact import verify_directory

    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"x")
    outside = tmp_path / "secret.txt"
    outside.write_text("not bertforge's")
    manifest = {"files": {"model.onnx": {"size": 1, "sha256": "0" * 64}, "../secret.txt": {"size": 15, "sha256": ""},
                          str(outside): {"size": 15, "sha256": ""}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_directory(folder)
    assert f"../secret.txt: not a plain file name inside {folder}" in problems
    assert f"{outside}: not a plain file name inside {folder}" in problems
    assert "model.onnx: sha256 differs from the manifest" in problems and len(problems) == 3


def test_validate_never_follows_a_variant_name_out_of_the_build(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    victim = tmp_path / "victim" / "fp32"
    shutil.copytree(out / "fp32", victim)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    marker = json.loads((out / "build.json").read_text())
    marker["variants"] = ["../victim/fp32"]
    (out / "build.json").write_text(json.dumps(marker))
    assert main(["validate", str(out), "--quiet"]) == 2
    assert "lists '../victim/fp32', which is no bertforge variant" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before  # nothing read there rewritten


def test_an_edited_cached_result_is_refused_and_measured_again(small_recipe, tmp_path, capsys, own_cache):
    from bertforge.cache import cache_root

    first = tmp_path / "first"
    assert build(small_recipe, first) == 0
    truth = json.loads((first / "report.json").read_text())["variants"]["int8-dynamic"]["metrics"]["top1_agreement"]
    edited = 0
    for path in (cache_root() / "results").glob("validation-*.json"):
        stored = json.loads(path.read_text())
        if stored["data"].get("top1_agreement") == truth and stored["data"].get("max_abs", 0) > 1e-3:  # int8's
            stored["data"]["top1_agreement"] = truth - 0.5
            os.chmod(path, 0o644)
            path.write_text(json.dumps(stored))
            edited += 1
    assert edited == 1, truth
    capsys.readouterr()
    second = tmp_path / "second"
    assert main(["build", "--recipe", str(small_recipe), "--out", str(second), "--progress", "plain"]) == 0
    assert "a cached validation result was refused" in capsys.readouterr().err
    again = json.loads((second / "report.json").read_text())["variants"]["int8-dynamic"]
    assert again["metrics"]["top1_agreement"] == truth and not again["evaluation_cached"]


def test_a_results_file_is_read_only_whatever_the_umask(small_recipe, tmp_path, own_cache):
    from bertforge.cache import cache_root

    previous = os.umask(0)
    try:
        assert build(small_recipe, tmp_path / "out") == 0
    finally:
        os.umask(previous)
    modes = {oct(p.stat().st_mode & 0o777) for p in (cache_root() / "results").glob("*.json")}
    assert modes and all(int(m, 8) & 0o222 == 0 for m in modes), modes


def test_cache_prune_skips_every_entry_a_running_build_has_used(tiny_checkpoint, own_cache):
    # a cache of its own: pruning to 0 GB must not take the session cache other tests build into
    import contextlib

    from bertforge import cache_admin
    from bertforge.pipeline import build_variants
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=str(tiny_checkpoint), variants=("fp32", "fused"))
    with contextlib.ExitStack() as hold:  # the build is still running: validation, report, ...
        state = build_variants(recipe, resolve(recipe.model), Progress("quiet"), hold)
        used = {run.artifact.path for run in state.artifacts.values()}
        removed = {entry.path for entry in cache_admin.prune(None, 0.0)}
        assert not used & removed and all(path.is_dir() for path in used)
    removed = {entry.path for entry in cache_admin.prune(None, 0.0)}  # the build is over
    assert used <= removed


def test_a_rebuild_whose_gates_fail_leaves_the_previous_build_as_it_was(small_recipe, tiny_checkpoint, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    before = (out / "report.json").read_bytes()
    strict = tmp_path / "strict.yaml"
    strict.write_text(small_recipe.read_text().replace("validation: {max_sentences: 20}", "validation:\n"
                      "  max_sentences: 20\n  gates:\n    int8-dynamic: {max_abs_max: 1.0e-9}\n"))
    capsys.readouterr()
    assert build(strict, out) == 1
    assert f"the previous build in {out} is kept as it was" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
    rejected = tmp_path / "out.rejected"
    assert json.loads((rejected / "report.json").read_text())["gates_passed"] is False


def test_files_a_user_put_in_out_stop_the_rebuild_before_any_work(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    (out / "notes.md").write_text("mine")
    (out / "fp32" / "extra.txt").write_text("mine too")  # inside a variant: replaced with it as well
    capsys.readouterr()
    assert build(small_recipe, out) == 2
    assert "holds files bertforge did not write (notes.md, fp32/extra.txt)" in capsys.readouterr().err
    (out / "notes.md").unlink()
    assert build(small_recipe, out) == 2
    assert "holds files bertforge did not write (fp32/extra.txt)" in capsys.readouterr().err
    assert (out / "fp32" / "extra.txt").read_text() == "mine too"


def test_files_added_to_out_during_a_rebuild_keep_the_previous_build_whole(small_recipe, tmp_path, capsys,
                                                                          monkeypatch):
    from bertforge import api

    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    before = (out / "report.json").read_bytes()
    validate = api.validate_and_report

    def added_meanwhile(*args, **kwargs):  # after the checks, before the new build takes out's place
        (out / "late.txt").write_text("mine")
        return validate(*args, **kwargs)

    monkeypatch.setattr(api, "validate_and_report", added_meanwhile)
    capsys.readouterr()
    assert build(small_recipe, out) == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.previous-")]
    assert len(kept) == 1 and (kept[0] / "late.txt").read_text() == "mine"
    assert (kept[0] / "report.json").read_bytes() == before and (kept[0] / "fp32" / "model.onnx").is_file()
    assert f"kept whole in {kept[0]}" in capsys.readouterr().err
    assert (out / "report.json").is_file() and not (out / "late.txt").exists()
    # with nothing added, the previous build is replaced and nothing is kept
    monkeypatch.setattr(api, "validate_and_report", validate)
    assert build(small_recipe, out) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.")] == [kept[0].name]


def test_an_out_inside_the_cache_is_refused(small_recipe, own_cache, capsys):
    out = own_cache / "stages" / "my-build"
    assert build(small_recipe, out) == 2
    assert f"--out {out} is inside the cache" in capsys.readouterr().err
    assert not out.exists()


def test_the_results_key_is_written_whole_and_leaves_no_draft(own_cache):
    from bertforge.results_cache import _secret

    key = _secret()
    assert len(key) == 32 and (own_cache / "results.key").read_bytes() == key == _secret()
    assert [p.name for p in own_cache.iterdir() if p.name.startswith(".results.key")] == []


def test_a_symbolic_link_as_out_is_refused(small_recipe, tmp_path, capsys):
    real = tmp_path / "real"
    assert build(small_recipe, real) == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    capsys.readouterr()
    assert build(small_recipe, link) == 2
    assert f"{link} is a symbolic link; name the directory it points to ({real})" in capsys.readouterr().err
    assert link.is_symlink() and (real / "report.json").is_file()


def test_out_as_the_current_directory_is_refused(small_recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    monkeypatch.chdir(out)
    assert build(small_recipe, ".") == 2
    assert "is the current directory or holds it" in capsys.readouterr().err
    assert (out / "report.json").is_file()


def test_validate_takes_the_builds_lock(small_recipe, tmp_path, capsys):
    from bertforge.output_dir import output_lock

    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    capsys.readouterr()
    with output_lock(out):  # a build of the same --out is running
        assert main(["validate", str(out), "--quiet"]) == 2
    assert f"another bertforge build or validate is writing {out}" in capsys.readouterr().err


def test_a_vocab_txt_without_its_mask_line_is_refused(tiny_checkpoint, tmp_path, capsys):
    """The tokenizer re-adds [MASK] after the vocabulary (id 30521, inside the model's rows) and every id
    after the missing line shifts by one: fill-mask would answer garbage with exit 0."""
    source = tmp_path / "no-mask-line"
    shutil.copytree(tiny_checkpoint, source)
    lines = (source / "vocab.txt").read_text().splitlines()
    lines.remove("[MASK]")
    (source / "vocab.txt").write_text("\n".join(lines) + "\n")
    (source / "tokenizer.json").unlink()  # the tokenizer is made from vocab.txt, as for many checkpoints
    out = tmp_path / "out"
    assert main(["build", "--model", str(source), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its vocabulary has no entry for its mask token '[MASK]'" in err, err
    assert not out.exists()


def test_one_field_of_a_section_given_to_the_api_keeps_the_recipes_other_fields(tmp_path):
    """bertforge.build(recipe, validation={...}) replaced the whole section: a recipe's corpus and
    int8_auto.target silently became the defaults."""
    from bertforge.recipe import load_recipe, merged, parse_recipe

    corpus = tmp_path / "domain.txt"
    corpus.write_text("A sentence of the domain.\n")
    path = tmp_path / "r.yaml"
    path.write_text(f"validation: {{corpus: {corpus}, seed: 3}}\nint8_auto: {{target: {{top1_min: 0.99}}}}\n")
    recipe = load_recipe(path, {"validation": {"max_sentences": 5}, "int8_auto": {"outlier_channels": 4}})
    assert (recipe.validation.corpus, recipe.validation.seed, recipe.validation.max_sentences) == (str(corpus), 3, 5)
    assert recipe.int8_auto.target.top1_min == 0.99 and recipe.int8_auto.outlier_channels == 4
    again = parse_recipe(merged(recipe.model_dump(mode="json", exclude_unset=True), {"validation": {"seed": 7}}))
    assert (again.validation.corpus, again.validation.seed, again.int8_auto.target.top1_min) == (str(corpus), 7, 0.99)


def test_a_hub_that_never_answers_is_a_one_line_error_within_the_timeout(tmp_path):
    """A server on 127.0.0.1 that accepts connections and never replies stands in for a stuck hub."""
    import socket
    import subprocess
    import sys
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept_and_hold() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"),
               BERTFORGE_HUB_TIMEOUT="4")
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "bertforge", "resolve", "someone/some-bert"], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()
    assert done.returncode == 2, done.stderr
    assert "did not answer within 4 s" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(("edit", "message"), [
    ({"num_hidden_layers": 100000}, "num_hidden_layers is 100000, its weights hold 2 layers"),
    ({"hidden_size": 64}, "vocab_size x hidden_size is 30522 x 64, its word embeddings are 30522 x 32")])
def test_config_sizes_are_checked_against_the_weight_headers_before_a_model_is_built(
        tiny_checkpoint, tmp_path, capsys, edit, message):
    import time

    source = tmp_path / "edited"
    shutil.copytree(tiny_checkpoint, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **edit}))
    started = time.monotonic()
    assert main(["build", "--model", str(source), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - started < 60  # it used to build all 100,000 layers first


def test_a_corpus_line_is_read_in_bounded_memory(tmp_path):
    """A 64 MB single-line corpus: read a bounded piece of the line at a time, and cut."""
    from bertforge.validation.corpus import MAX_LINE_CHARS, load_lines

    corpus = tmp_path / "one-line.txt"
    with open(corpus, "w", encoding="utf-8") as handle:
        for _ in range(64):
            handle.write("word " * 200_000)  # 1 MB at a time, no newline
        handle.write("\nA second, ordinary sentence.\n")
    lines = load_lines(str(corpus))
    assert len(lines) == 2 and len(lines[0]) <= MAX_LINE_CHARS and lines[1] == "A second, ordinary sentence."


def test_validate_refuses_variants_it_would_ignore_and_names_a_broken_build_json(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:  # not a flag of validate's: argparse's exit 2
        main(["validate", str(out), "--variants", "fp32", "--quiet"])
    assert usage.value.code == 2 and "unrecognized arguments: --variants fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "--variants" not in capsys.readouterr().out
    (out / "build.json").write_text("{not json")
    assert main(["validate", str(out), "--quiet"]) == 2
    assert f"{out / 'build.json'}: not a bertforge build.json" in capsys.readouterr().err


def test_max_sentences_over_lines_with_nothing_to_mask_is_refused_before_any_stage(tiny_checkpoint, tmp_path,
                                                                                  capsys):
    """It used to build every variant, then crash with UnboundLocalError in validation (exit 3)."""
    corpus = tmp_path / "corpus.txt"
    far = " ".join(["word"] * 200) + " [MASK]."  # its own [MASK] past the tiny model's 128 positions
    corpus.write_text(f"[CLS] [SEP]\n{far}\nA sentence with words to mask.\n")
    out = tmp_path / "out"
    assert main(["build", "--model", str(tiny_checkpoint), "--corpus", str(corpus), "--max-sentences", "2",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none of its first 2 of its 3 lines has a word to mask" in err and "[MASK] past the" in err, err
    assert not out.exists()


def test_bench_inputs_for_a_small_vocabulary_with_its_special_tokens_at_the_top():
    from bertforge.bench import InputSpec, synthetic_inputs

    spec = InputSpec(vocab_size=1000, cls_id=997, sep_id=998, mask_id=999, max_positions=32)
    ids = synthetic_inputs(2, 16, spec)["input_ids"]  # it raised: low (1000) was the vocabulary's size
    assert ids.shape == (2, 16) and ids.max() < 1000 and (ids[:, 0] == 997).all() and (ids[:, 8] == 999).all()
    words = np.delete(ids, [0, 8, 15], axis=1)
    assert not np.isin(words, [997, 998, 999]).any()


def test_a_weight_shaped_like_the_vocabulary_is_not_taken_for_a_second_table(tmp_path):
    """A model whose FFN is vocabulary-wide (intermediate_size == vocab_size): the export used to report
    a failed tied-weight dedup because another initializer had the table's shape."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from bertforge.exporter import export
    from bertforge.exporter.config import ExportConfig
    from conftest import TINY, small_cased_vocab

    source = tmp_path / "wide-ffn"
    source.mkdir()
    (source / "vocab.txt").write_text("\n".join(small_cased_vocab()) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, type_vocab_size=1, pad_token_id=0,
                        **{**TINY, "intermediate_size": 1000, "max_position_embeddings": 32})
    BertForMaskedLM(config).eval().save_pretrained(source)
    BertTokenizerFast(vocab_file=str(source / "vocab.txt"), do_lower_case=False,
                      model_max_length=32).save_pretrained(source)
    out = tmp_path / "export"
    out.mkdir()
    meta = export.run(source, out, ExportConfig())
    assert meta["tied_embedding_copies"] == 1


def test_a_probe_longer_than_the_model_takes_is_refused_before_any_stage(tiny_checkpoint, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    long_probe = " ".join(["word"] * 300) + " [MASK]."
    recipe.write_text(json.dumps({"model": str(tiny_checkpoint), "validation": {"probes": [long_probe]}}))
    out = tmp_path / "out"
    assert main(["build", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "validation.probes.0: " in err and "word pieces, more than the 128 the model takes" in err, err
    assert not out.exists()


def test_an_unknown_op_type_in_the_fp16_block_list_is_a_recipe_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("fp16: {op_block_list: [Softmax, Bogus]}\n")
    assert main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "'fp16.op_block_list': Value error, 'Bogus' is not an ONNX or onnxruntime op type" in (
        capsys.readouterr().err)


def test_a_gate_of_inf_is_refused_so_no_json_bertforge_writes_holds_infinity(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("validation: {gates: {fp32: {max_abs_max: .inf}}}\n")
    assert main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "'validation.gates.fp32.max_abs_max': Input should be a finite number" in capsys.readouterr().err


def test_inspect_refuses_an_empty_model_file(tmp_path, capsys):
    variant = tmp_path / "v"
    variant.mkdir()
    (variant / "model.onnx").write_bytes(b"")
    assert main(["inspect", str(variant)]) == 2
    assert "is not an ONNX model (ir_version 0, 0 nodes)" in capsys.readouterr().err


def test_a_foreign_directory_where_a_failing_rebuild_would_go_is_refused_before_any_work(small_recipe, tmp_path,
                                                                                          capsys, monkeypatch):
    from bertforge import pipeline

    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    foreign = tmp_path / "out.rejected"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("mine")
    monkeypatch.setattr(pipeline, "run_stage", lambda *a, **k: pytest.fail("a stage ran before the check"))
    capsys.readouterr()
    assert build(small_recipe, out) == 2
    assert f"{foreign} exists and is not a bertforge output directory" in capsys.readouterr().err
    assert (foreign / "mine.txt").read_text() == "mine"
    # a rejected build there with a file of yours added is refused too
    shutil.rmtree(foreign)
    shutil.copytree(out, foreign)
    (foreign / "fp32" / "analysis.txt").write_text("mine")
    assert build(small_recipe, out) == 2
    assert "holds files bertforge did not write (fp32/analysis.txt)" in capsys.readouterr().err
    assert (foreign / "fp32" / "analysis.txt").read_text() == "mine"


def test_a_damaged_variant_is_bad_input_named_by_its_file(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    garbage = tmp_path / "garbage"
    shutil.copytree(out, garbage)
    model = garbage / "int8-dynamic" / "model.onnx"
    model.write_bytes(b"garbage\n")
    capsys.readouterr()
    for command in (["fill-mask", str(model.parent), "a [MASK] b"], ["bench", str(model.parent)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"bertforge: error: {model}: onnxruntime ") and "cannot load it" in err[-1], err
    assert main(["validate", str(garbage), "--quiet"]) == 2
    assert f"{model.parent}: model.onnx: size 8 != " in capsys.readouterr().err

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(out / "fp32", tokenizer)
    (tokenizer / "tokenizer.json").write_bytes(b"\xff\xfe\x00 not json")
    assert main(["fill-mask", str(tokenizer), "a [MASK] b"]) == 2
    assert f"{tokenizer / 'tokenizer.json'}: not a tokenizer file" in capsys.readouterr().err


def test_a_full_disk_says_so_and_leaves_nothing_half_written(small_recipe, tmp_path, capsys):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "out"
        capsys.readouterr()
        assert build(small_recipe, out) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert "failed: no space left on the device writing " in err[-1], err
        assert "Wire format" not in err[-1] and "Errno" not in err[-1]
        assert not list(disk.iterdir())  # the staging directory went with the failure
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_vocab_that_does_not_decode_is_named(tiny_checkpoint, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "tokenizer.json").unlink()
    (checkpoint / "vocab.txt").write_bytes(b"\xff\xfe\x00[MASK]\n")
    assert main(["build", "--model", str(checkpoint), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint}: its tokenizer (vocab.txt, tokenizer_config.json) does not load" in err, err


def test_importing_the_libraries_a_build_uses_leaves_nothing_in_the_temp_directory(tmp_path):
    import subprocess
    import sys

    temp = tmp_path / "t"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), BERTFORGE_CACHE=str(tmp_path / "cache"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    # transformers' tokenizer import pulls in torch._dynamo, which makes torch's compile cache at once
    done = subprocess.run([sys.executable, "-c", "import bertforge; from transformers import AutoTokenizer"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(temp.iterdir()) == []
    assert (tmp_path / "cache" / "torchinductor").is_dir()


def test_a_corrupt_json_file_is_named_with_exit_2_and_verify_calls_it_changed(small_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(small_recipe, out) == 0
    broken_report = tmp_path / "broken-report"
    shutil.copytree(out, broken_report)
    (broken_report / "report.json").write_text("{bad")
    capsys.readouterr()
    assert main(["compare", str(out), str(broken_report)]) == 2
    assert f"{broken_report / 'report.json'}: not readable JSON" in capsys.readouterr().err

    broken_manifest = tmp_path / "broken-manifest"
    shutil.copytree(out, broken_manifest)
    manifest = broken_manifest / "fp32" / "manifest.json"
    manifest.write_text("{bad")
    for command in (["validate", str(broken_manifest), "--quiet"], ["fill-mask", str(manifest.parent), "a [MASK]"]):
        assert main(command) == 2, command
        assert f"{manifest}: not readable JSON" in capsys.readouterr().err
    assert main(["verify", str(broken_manifest)]) == 1
    printed = capsys.readouterr().out
    assert f"{manifest.parent}: CHANGED" in printed and f"{manifest}: not readable JSON" in printed


def test_config_json_is_read_once_into_checked_fields(tmp_path):
    from bertforge.errors import UsageError
    from bertforge.onnx_files import ModelConfig, model_config

    fields = {"vocab_size": 1000, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps({**fields, "model_type": "bert"}))
    assert model_config(tmp_path) == ModelConfig(**fields)  # positions and token types optional
    (tmp_path / "config.json").write_text(json.dumps({**fields, "hidden_size": "64"}))
    with pytest.raises(UsageError, match=r"config.json: hidden_size is '64', not a positive integer"):
        model_config(tmp_path)


def test_a_hub_model_cached_without_its_weights_is_completed_from_the_hub(tiny_checkpoint, tmp_path, monkeypatch):
    """AutoTokenizer leaves a snapshot of config and vocabulary only: resolving the model asks the hub for
    the rest (its client stands in here: the hub is unreachable from the tests) rather than stopping at
    'has no weights'; with the hub unreachable, the line says both. The model card comes too (its license)."""
    import huggingface_hub

    from bertforge.errors import SourceError
    from bertforge.sources.hub import resolve_hub

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "vocab.txt"):
        shutil.copyfile(tiny_checkpoint / name, partial / name)
    asked: list[tuple[bool, tuple[str, ...]]] = []

    def snapshot_download(repo_id, allow_patterns, local_files_only):
        asked.append((local_files_only, tuple(allow_patterns)))
        if local_files_only:
            return str(partial)
        if hub_reachable:
            return str(tiny_checkpoint)
        raise OSError("no route to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub_reachable = True
    assert resolve_hub("someone/some-bert") == tiny_checkpoint
    assert [local for local, _ in asked] == [True, True, False] and all("README.md" in p for _, p in asked)
    hub_reachable = False
    with pytest.raises(SourceError, match="has no weights .*; the Hugging Face hub, which could complete it"):
        resolve_hub("someone/some-bert")


def test_validate_finds_a_relative_model_path_from_any_directory(tiny_checkpoint, tmp_path, monkeypatch):
    local = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_checkpoint, local)
    monkeypatch.chdir(tmp_path / "models")
    out = tmp_path / "out"
    assert main(["build", "--model", "./tiny", "--variants", "fp32", "--out", str(out), "--quiet", "--no-latency",
                 "--max-sentences", "20"]) == 0
    assert json.loads((out / "build.json").read_text())["recipe"]["model"] == str(local)
    monkeypatch.chdir(tmp_path)  # where ./tiny is nothing
    assert main(["validate", str(out), "--quiet", "--no-latency"]) == 0


def test_verify_names_a_manifest_that_is_not_bertforges_instead_of_crashing(tmp_path, capsys):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"x")
    for manifest, said in (({"nofiles": 1}, "not a bertforge manifest (no 'files' mapping)"),
                           ({"files": {"model.onnx": {}}}, "model.onnx: the manifest gives no size and sha256"),
                           ({"files": {"model.onnx": {"size": "1", "sha256": ""}}}, "gives no size and sha256")):
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert main(["verify", str(folder)]) == 1
        assert said in capsys.readouterr().out
