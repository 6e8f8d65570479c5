"""The position vocabulary has one rule: the settings, the cell check of a detector card and the label
stage's indices all read it from truthmap/positions.py."""

import pytest

from truthmap.config import Config
from truthmap.errors import TruthmapError
from truthmap.positions import NAMED_POSITIONS, check_cell, check_positions, is_position


@pytest.mark.parametrize("name", [*NAMED_POSITIONS, "-1", "-8", "-999999",
                                  "-0", "-01", "-1000000", "-²", "1", "last", "", " -1"])
def test_the_settings_and_the_cell_check_accept_the_same_position_names(name):
    try:
        Config(positions=[name])
        by_settings = True
    except TruthmapError:
        by_settings = False
    try:
        check_cell("residual", 3, name)
        by_cell = True
    except TruthmapError:
        by_cell = False
    try:
        check_positions([name])
        by_list = True
    except TruthmapError:
        by_list = False
    assert by_settings == by_cell == by_list == is_position(name)
    assert is_position(name) == (name in NAMED_POSITIONS or name in ("-1", "-8", "-999999"))
