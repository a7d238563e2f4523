"""Forecast windows of a series resampled at another rate: the same times at every spacing."""

import numpy as np
import pytest

from effitrans.data.timeseries import resampled_windows


def test_spacing_one_is_the_plain_windows_and_finer_spacings_interpolate():
    values = np.stack([np.arange(40.0), np.arange(40.0) ** 2], -1)  # [T, 2]
    starts = np.array([10, 20])
    x, y = resampled_windows(values, starts, 8, 4, 1.0)
    assert x.shape == (2, 8, 2) and y.shape == (2, 4, 2)
    np.testing.assert_array_equal(x[1], values[12:20])
    np.testing.assert_array_equal(y[1], values[20:24])
    x2, y2 = resampled_windows(values, starts, 8, 4, 0.5)  # twice the rate: 16 inputs, 8 targets
    assert x2.shape == (2, 16, 2) and y2.shape == (2, 8, 2)
    np.testing.assert_array_equal(x2[:, ::2], x)  # the original samples stay
    np.testing.assert_allclose(y2[0, 1::2, 0], np.arange(10.5, 14.0))  # linear in between
    np.testing.assert_allclose(y2[0, 1, 1], (100 + 121) / 2)
    xh, yh = resampled_windows(values, starts, 8, 4, 2.0)  # half the rate
    np.testing.assert_array_equal(xh, x[:, ::2])
    np.testing.assert_array_equal(yh, y[:, ::2])


@pytest.mark.parametrize(
    ("starts", "spacing", "message"),
    [
        ([10], 3.0, r"must be whole multiples of spacing=3.0"),
        ([10], 0.0, r"spacing=0.0 must be a number > 0"),
        ([4], 1.0, r"starts must lie in \[input_len=8, T - 1 - pred_len=35\]"),
        ([36], 0.5, r"starts must lie in"),
    ],
)
def test_bad_windows_name_the_argument(starts, spacing, message):
    with pytest.raises(ValueError, match=message):
        resampled_windows(np.zeros((40, 1)), np.array(starts), 8, 4, spacing)
