"""int8-auto's recipe section: the agreement target, the schemes, the calibration split."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictInt

from bertforge.cpu_target import Target
from bertforge.section import Section


class AgreementTarget(Section):
    top1_min: float = Field(0.95, ge=0, le=1)
    ref_top1_in_top5_min: float | None = Field(0.995, ge=0, le=1)
    kl_mean_max: float | None = Field(None, ge=0)


class Int8AutoConfig(Section):
    cpu_target: Target = "portable"  # as int8_dynamic's, for every int8 scheme of the plan and the tied table
    # Agreement with the fp32 graph at the [MASK] positions of the calibration split (not the validation
    # corpus); the validation gates then judge the chosen plan on the validation corpus.
    target: AgreementTarget = AgreementTarget()
    # Fail (one line, with the best agreement reached within it) when the plan that meets the target is
    # slower than this fraction of the fp32 graph's latency (b1 x s128, ORT profiler).
    max_latency_ratio: float | None = Field(None, gt=0)
    # int8-smooth was opt-in while the calibration split was the demo head's fit sentences (its plan met
    # the target there and kept 93.7% on the validation corpus). On sentences the head never saw, demo's
    # plan with it: 95.2% on the calibration split, 96.7% on the validation corpus, at 0.65x fused.
    # int8-outlier is opt-in: alone it cuts the KL of demo's FFN down-projections 2-20x, but demo's plan
    # that meets 95% keeps those fp32 anyway (its head's margins leave room for ~5 int8 groups), so it
    # only made the search 40% longer there (same plan).
    # int8-token is opt-in too: alone it lifts demo's FFN down-projections by 4-10 points of top-1 over
    # int8-dynamic, and the whole encoder in it keeps 83% against 72%; but the 95% plan it finds is as
    # fast (predicted 0.701x the fp32 graph, against 0.698x without it, from the same measured costs),
    # and the search takes 1.5x as long (112 s against 74 s)
    schemes: tuple[Literal["int8-dynamic", "int8-smooth", "int8-token", "int8-outlier", "int8-blockwise"], ...] = (
        "int8-dynamic", "int8-smooth", "int8-blockwise")
    # int8-outlier: how many input channels (those of largest max|x| on the calibration split) stay fp32
    outlier_channels: StrictInt = Field(8, ge=1, le=64)
    block_size: Literal[16, 32, 64, 128, 256] = 16  # for int8-blockwise groups
    # SmoothQuant's migration strengths tried for each int8-smooth group, which keeps the one of lowest
    # KL: 0 leaves x as it is, 1 moves all of its per-channel range into the weights. Each value costs
    # one more evaluation per group. On demo, [0.5, 0.65, 0.8] took the search from 103 s to 195 s for
    # a plan at 0.627x fused instead of 0.644x (validation top-1 96.4% and 96.7%): not the default.
    smooth_alphas: tuple[Annotated[float, Field(ge=0, le=1)], ...] = Field((0.8,), min_length=1)
    calibration_corpus: str = "calibration"
    # The sensitivity table (each group alone) is measured on every n-th calibration batch (batches
    # sorted by length, so each share spans all lengths); the bisection and the chosen plan's agreement
    # use every batch. The table is most of the search (about 100 evaluations on bert-base, each over
    # the batches), and it only orders the moves: on demo the even and the odd half of the batches gave
    # the plan all batches give (same 6 groups int8); on synthetic:bert-base-uncased 27 and 28 int8
    # groups against 28. Every 4th batch moved demo's plan by a group and bert-base's from 28 to 23 or 31.
    sensitivity_stride: StrictInt = Field(2, ge=1, le=8)
    # Where int8-dynamic and int8-smooth are both schemes, the table measures for each group only the one
    # its output error on its own fp32 inputs favours (optimizers/int8_auto/screen.py; both where they are within 10-20%
    # of each other): one run of the fp32 graph instead of one table evaluation per group. Off: both;
    # off too with several smooth_alphas (the screen knows the last alpha only, the table picks one).
    screen_schemes: bool = True
    # Where the tied table's decoder is int8, what the embeddings read: `int8`, the decoder's per-row
    # int8 table, stored once, or `fp16`, their own fp16 copy (+2 bytes per weight: +23 MB on demo, +47 MB
    # on bert-base). On demo the tied table alone keeps 96.6% top-1 with int8 embeddings, 98.7% with
    # fp16 ones (calibration split), but the plan for a 95% target was the same (same speed) and
    # validated at 97.3% instead of 96.7%: accuracy for size, so opt-in.
    embedding_table: Literal["int8", "fp16"] = "int8"
