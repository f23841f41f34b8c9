"""Arithmetic tasks: ``add``, ``sub``, ``mul`` and ``div``, each over two or more numbers."""

from __future__ import annotations

import functools
import operator

import yadtqd
from yadtqd.hookspecs import Register

Number = int | float


def add(*numbers: Number) -> Number:
    """The sum of the numbers."""
    return sum(numbers)


def sub(first: Number, *rest: Number) -> Number:
    """The first number minus all the others."""
    return first - sum(rest)


def mul(*numbers: Number) -> Number:
    """The product of the numbers."""
    return functools.reduce(operator.mul, numbers, 1)


def div(first: Number, *rest: Number) -> Number:
    """The first number divided by each of the others in turn (ZeroDivisionError on 0)."""
    return functools.reduce(operator.truediv, rest, first)


@yadtqd.hookimpl
def yadtq_register_tasks(register: Register) -> None:
    """Register the arithmetic tasks."""
    for function in (add, sub, mul, div):
        register(function.__name__, function)
