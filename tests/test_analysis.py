"""Which names a %%gpu cell pushes (reads first) and pulls back (binds)."""

from __future__ import annotations

import pytest

from jupyter_gpu.analysis import analyse_cell


@pytest.mark.parametrize(
    ("code", "free", "bound"),
    [
        ("y = x * 2", ["x"], ["y"]),
        ("x = 1\ny = x + 1", [], ["x", "y"]),
        ("x = x + 1", ["x"], ["x"]),
        ("total += step", ["total", "step"], ["total"]),
        ("import numpy as np\na = np.zeros(n)", ["n"], ["np", "a"]),
        ("import os.path", [], ["os"]),
        ("from math import pi as PI", [], ["PI"]),
        ("def f(q):\n    return model(q) + bias\n", ["model", "bias"], ["f"]),
        ("def f(q, k=default):\n    local = q\n    return local", ["default"], ["f"]),
        ("class Net(Base):\n    size = width\n", ["Base", "width"], ["Net"]),
        ("for i in range(n):\n    acc = i\n", ["n"], ["acc", "i"]),
        ("with open(path) as fh:\n    text = fh.read()", ["path"], ["fh", "text"]),
        ("squares = [v * v for v in values if v > cut]", ["values", "cut"], ["squares"]),
        ("if (m := limit) > 3:\n    print(m)", ["limit"], ["m"]),
        ("def g():\n    global counter\n    counter = 1\n", [], ["g", "counter"]),
        ("try:\n    r = risky()\nexcept ValueError as err:\n    print(err)", ["risky"], ["r"]),
        ("print(len(data))", ["data"], []),
        ("f = lambda z: z + offset", ["offset"], ["f"]),
    ],
)
def test_free_and_bound_names(code: str, free: list[str], bound: list[str]) -> None:
    names = analyse_cell(code)
    assert names.free == free
    assert sorted(names.bound) == sorted(bound)


def test_a_name_bound_only_in_a_branch_is_still_pushed_when_read_later() -> None:
    # After the if, x may or may not exist remotely: the local value must go along.
    names = analyse_cell("if flag:\n    x = 1\nprint(x)")
    assert names.free == ["flag", "x"]


def test_syntax_errors_surface_as_python_reports_them() -> None:
    with pytest.raises(SyntaxError):
        analyse_cell("def broken(:\n")
