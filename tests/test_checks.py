"""The shared argument checks: what passes, and what each mistake says."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tl_latentspaces.checks import ArgumentTypeError, check_bool, check_float, check_int


def test_check_int_accepts_integers_of_any_kind():
    assert check_int(3, "k", minimum=1) == 3
    value = check_int(np.int64(7), "k", minimum=1, maximum=7)
    assert value == 7 and type(value) is int
    assert check_int(torch.tensor(2), "k", minimum=0) == 2


@pytest.mark.parametrize("bad", [True, 4.0, "4", None, [4]])
def test_check_int_wrong_type_is_a_type_and_a_value_error(bad):
    with pytest.raises(ArgumentTypeError, match=r"k must be an int in \[1, 8\] \(why\), got .*Fix: pass int\(k\)") as info:
        check_int(bad, "k", minimum=1, maximum=8, why=" (why)")
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_check_int_range():
    with pytest.raises(ValueError, match=r"n must be an int >= 2, got 1\.$"):
        check_int(1, "n", minimum=2)
    with pytest.raises(ValueError, match=r"in \[0, 3\].*got 4"):
        check_int(4, "n", minimum=0, maximum=3)


def test_check_bool():
    assert check_bool(False, "flag") is False
    with pytest.raises(TypeError, match=r"flag must be True or False, got int \(1\)"):
        check_bool(1, "flag")


def test_check_float():
    assert check_float(np.float32(0.25), "f", minimum=0.0, maximum=0.5, open_minimum=True) == 0.25
    assert check_float(2, "f", minimum=0.0) == 2.0
    for bad, match in [(0.0, r"f must be a finite number > 0.0 and <= 0.5, got 0.0"), (math.nan, "got nan"),
                       (0.75, "got 0.75"), (math.inf, "got inf")]:
        with pytest.raises(ValueError, match=match):
            check_float(bad, "f", minimum=0.0, maximum=0.5, open_minimum=True)
    with pytest.raises(ArgumentTypeError, match=r"got str \('x'\)"):
        check_float("x", "f", minimum=0.0)
    with pytest.raises(ArgumentTypeError, match="got bool"):
        check_float(True, "f", minimum=0.0)
