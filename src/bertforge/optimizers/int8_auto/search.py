"""Choose a scheme per group: the fastest plan whose agreement on the calibration split meets a target.

Not a blind search. From the sensitivity table (each group quantized alone: KL to the reference) and
the measured cost of each group in each scheme:

1. per group, its schemes ordered from cheapest to dearest, keeping only those that are also more
   accurate than every cheaper one (Pareto), then the lower convex hull of (cost, KL): a move along
   it buys the most KL per millisecond first;
2. every group starts in its cheapest scheme; all moves of all groups are sorted by KL removed per
   millisecond added (ties: graph order), which is the order a greedy upgrade would take them;
3. the shortest prefix of that order whose measured agreement meets the target is found by
   bisection (agreement grows with the prefix, the last prefix is the most accurate plan), so a
   model with G groups costs about log2(G) + 1 evaluations: the last prefix, every group fp32, is the
   reference's own graph and is not run.

Deterministic: KL comes from deterministic sessions, and the costs it is given are already rounded
(costs.modelled_costs: a per-scheme rate, 2 significant digits), so profiler noise does not reorder
the moves; here they are only cut to 6 significant digits against float residue. (They used to be
rounded to 0.01 ms, which made every scheme of a small model's group cost 0 and left it all fp32.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bertforge.errors import UsageError
from bertforge.progress import report

# the all-fp32 plan's agreement with the fp32 reference (search: it is not run)
REFERENCE_AGREEMENT = {"top1_agreement": 1.0, "ref_top1_in_top5": 1.0, "kl_mean": 0.0}
KL_FLOOR = 1e-12


@dataclass(frozen=True)
class Move:
    group: str
    scheme: str  # the scheme the group moves to
    kl_removed: float
    ms_added: float
    order: int  # the group's position in the graph: the tie-break

    @property
    def efficiency(self) -> float:
        return self.kl_removed / max(self.ms_added, 1e-6)


def hull(options: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """(scheme, ms, kl) options -> the chain a greedy upgrade follows: cheapest first, KL falling,
    KL removed per ms falling (lower convex hull)."""
    chain: list[tuple[str, float, float]] = []
    for option in sorted(options, key=lambda o: (o[1], o[2])):
        if chain and option[2] >= chain[-1][2]:
            continue  # dearer and not more accurate: never worth it
        chain.append(option)
        while len(chain) >= 3:
            (_, m0, k0), (_, m1, k1), (_, m2, k2) = chain[-3:]
            if (k0 - k1) / max(m1 - m0, 1e-6) <= (k1 - k2) / max(m2 - m1, 1e-6):
                del chain[-2]  # the middle point is above the hull: skip straight to the better one
            else:
                break
    return chain


def ordered_moves(groups: list[str], costs: dict[str, dict[str, float]],
                  kl: dict[str, dict[str, float]]) -> tuple[dict[str, str], list[Move]]:
    """The starting plan (cheapest scheme per group) and every upgrade, best KL per ms first."""
    start: dict[str, str] = {}
    moves: list[Move] = []
    for order, group in enumerate(groups):
        # an int8 scheme's KL is never below KL_FLOOR: KL of equal logits comes out as +-2e-14, and one at or
        # under fp32's 0 dropped fp32 off the hull, so the last prefix was no longer the most accurate plan
        options = [(scheme, float(f"{ms:.6g}"), 0.0 if scheme == "fp32" else max(kl[group].get(scheme, 0.0), KL_FLOOR))
                   for scheme, ms in costs[group].items()]
        chain = hull(options)
        start[group] = chain[0][0]
        for (_, ms_a, kl_a), (scheme_b, ms_b, kl_b) in zip(chain, chain[1:], strict=False):
            moves.append(Move(group, scheme_b, kl_a - kl_b, ms_b - ms_a, order))
    moves.sort(key=lambda m: (-m.efficiency, m.order))
    return start, moves


def plan_after(start: dict[str, str], moves: list[Move], count: int) -> dict[str, str]:
    plan = dict(start)
    for move in moves[:count]:
        plan[move.group] = move.scheme
    return plan


def meets(agreement: dict[str, float], target: dict[str, float | None]) -> bool:
    """Agreement keys are minimums, `kl_mean` a maximum."""
    return all(value is None or (agreement[key] <= value if key == "kl_mean" else agreement[key] >= value)
               for key, value in target.items())


def search(start: dict[str, str], moves: list[Move], evaluate: Callable[[dict[str, str]], dict[str, float]],
           target: dict[str, float | None], latency_of: Callable[[dict[str, str]], float],
           max_latency_ratio: float | None) -> dict[str, Any]:
    """Bisection over the move prefix; every evaluation is recorded."""
    evaluations: list[dict[str, Any]] = []
    measured: dict[int, dict[str, float]] = {}  # moves applied -> the plan's agreement

    def measure(count: int) -> dict[str, float]:
        if count in measured:  # a prefix measured already (the latency bound's plan may be one)
            return measured[count]
        plan = plan_after(start, moves, count)
        if all(scheme == "fp32" for scheme in plan.values()):
            # the fp32 graph is the reference itself: its agreement is exact by definition, and running it
            # over the calibration split was the dearest evaluation of a search (the most accurate plan is
            # all fp32 wherever every group keeps fp32 on its hull, i.e. in every search that bisects)
            agreement, run = dict(REFERENCE_AGREEMENT), False
        else:
            report(f"plan {sum(e['run'] for e in evaluations) + 1} (bisection over {len(moves)} moves)")
            agreement, run = evaluate(plan), True
        evaluations.append({"moves": count, "latency_ratio": round(latency_of(plan), 4), **agreement, "run": run})
        measured[count] = agreement
        return agreement

    low, high = 0, len(moves)
    if meets(measure(low), target):
        high = low
    else:
        best = measure(high)
        if not meets(best, target):
            raise UsageError(f"int8-auto: no plan meets the target {describe(target)} on the calibration split; "
                             f"the most accurate plan reaches {describe(best)}")
        while high - low > 1:
            middle = (low + high) // 2
            if meets(measure(middle), target):
                high = middle
            else:
                low = middle
    plan = plan_after(start, moves, high)
    ratio = latency_of(plan)
    if max_latency_ratio is not None and ratio > max_latency_ratio:
        within = max((count for count in range(len(moves) + 1)
                      if latency_of(plan_after(start, moves, count)) <= max_latency_ratio), default=None)
        if within is None:
            raise UsageError(f"int8-auto: no plan is within max_latency_ratio {max_latency_ratio:g} "
                             f"(the fastest is {latency_of(start):.2f}x the fp32 graph)")
        best = measure(within)
        if not meets(best, target):
            raise UsageError(f"int8-auto: the target {describe(target)} needs {ratio:.2f}x the fp32 graph's "
                             f"latency, over max_latency_ratio {max_latency_ratio:g}; within it the best plan "
                             f"reaches {describe(best)}")
        # agreement on a finite split is not quite monotonic in the prefix: the bisection can settle past a
        # plan within the bound that already meets the target; that plan is the answer
        high, plan = within, plan_after(start, moves, within)
        ratio = latency_of(plan)
    return {"plan": plan, "moves_applied": high, "calibration": dict(measured[high]),
            "predicted_latency_ratio": round(ratio, 4), "evaluations": evaluations}


def describe(values: dict[str, float | None]) -> str:
    names = {"top1_agreement": "top-1", "ref_top1_in_top5": "ref top-1 in top-5", "kl_mean": "KL"}
    parts = [f"{names[key]} {value:.2%}" if key != "kl_mean" else f"KL {value:.2e}"
             for key, value in values.items() if value is not None and key in names]
    return ", ".join(parts)
