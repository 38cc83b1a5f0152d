"""The learning-rate schedule: piecewise linear in epochs, knots written in `epochs` (Page's PiecewiseLinear).

Page writes his schedules relative to the run, PiecewiseLinear([0, epochs/5, epochs - ema_epochs], ...),
so the configs do too (`optim.schedule.epochs: [0, epochs*5/24, epochs]`): `epochs=N` keeps the shape.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from cifar_speedrun.errors import UserError


class PiecewiseLinear:
    """LR multiplier as a function of the optimizer step: linear between (epoch, value) points.

    A class, not a lambda, so LambdaLR can save it in checkpoints. Step k (0-based) is the k-th
    optimizer update and uses the schedule at (k + 1) / steps_per_epoch epochs: cifar10-fast's
    optimizer increments its step counter before it looks the lr up, so its first update also uses
    the value one step in (never lr 0) and its last lands exactly on the final point. Outside the
    points the value is held (np.interp), as in cifar10-fast's PiecewiseLinear.
    """

    def __init__(self, epochs: Sequence[float], values: Sequence[float], steps_per_epoch: int) -> None:
        self.epochs = [float(e) for e in epochs]
        self.values = [float(v) for v in values]
        self.steps_per_epoch = int(steps_per_epoch)

    def at_epoch(self, epoch: float) -> float:
        return float(np.interp(epoch, self.epochs, self.values))

    def __call__(self, step: int) -> float:
        return self.at_epoch((step + 1) / self.steps_per_epoch)


_KNOT_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def resolve_knots(knots: Sequence[float | int | str], epochs: float) -> list[float]:
    """The schedule's knots as numbers of epochs; each knot is a number or arithmetic in `epochs`.

    Page writes his schedules relative to the run, PiecewiseLinear([0, epochs/5, epochs - ema_epochs],
    ...), so changing the number of epochs keeps the shape of the schedule. The configs do the same:
    `[0, epochs/5, epochs - 2]` reads like his code and follows `epochs=N`; plain numbers stay fixed.
    Only numbers, `epochs`, + - * / and parentheses are accepted (parsed with `ast`, never eval'd).
    """

    def value(node: ast.AST, text: str) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "epochs":
            return float(epochs)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand, text)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _KNOT_OPERATORS:
            left, right = value(node.left, text), value(node.right, text)
            if isinstance(node.op, ast.Div) and right == 0:
                raise UserError(f"optim.schedule.epochs knot {text!r} divides by zero")
            return _KNOT_OPERATORS[type(node.op)](left, right)
        raise UserError(
            f"optim.schedule.epochs knot {text!r} is not a number or an expression in `epochs` "
            "(use numbers, epochs, + - * /, e.g. [0,epochs/5,epochs])"
        )

    resolved = []
    for knot in knots:
        if isinstance(knot, bool):
            raise UserError(f"optim.schedule.epochs knot {knot!r} is not a number")
        if isinstance(knot, (int, float)):
            resolved.append(float(knot))
            continue
        text = str(knot).strip()
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError:
            raise UserError(
                f"optim.schedule.epochs knot {text!r} is not a number or an expression in `epochs` "
                "(e.g. [0,epochs/5,epochs])"
            ) from None
        resolved.append(value(tree.body, text))
    bad = [text for text, number in zip(knots, resolved, strict=True) if not math.isfinite(number)]
    if bad:
        raise UserError(f"optim.schedule.epochs knot {bad[0]!r} is not a finite number of epochs")
    return resolved


def check_schedule(epochs: Sequence[float], values: Sequence[float]) -> None:
    if len(epochs) != len(values) or len(epochs) < 2:
        raise UserError(
            f"optim.schedule has {len(epochs)} epochs and {len(values)} factors; give two or more "
            "(epoch, value) points of equal length, e.g. epochs=[0,5,24] factors=[0,1,0]"
        )
    if any(b < a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise UserError(f"optim.schedule.epochs={list(epochs)} are out of order; list them increasing")
    if any(v < 0 for v in values):
        raise UserError(f"optim.schedule.factors={list(values)} has a negative learning-rate factor")


def group_schedules(built: Any, run_schedule: PiecewiseLinear, epochs: float) -> list[PiecewiseLinear]:
    """One lr multiplier per parameter group of `built.optimizer` (an optim.Built): the run's schedule,
    or the group's own knots where the recipe gives it some (airbench's whitening bias)."""
    schedules = []
    for group in built.optimizer.param_groups:
        own = built.group_knots.get(group.get("name", ""))
        schedules.append(run_schedule if own is None else
                         PiecewiseLinear(resolve_knots(own[0], epochs), own[1], run_schedule.steps_per_epoch))
    return schedules
