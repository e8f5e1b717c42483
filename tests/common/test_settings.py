"""The settings object read from an environment (common.settings): the limits added with the
group commit and the workers' priority, and what a value out of range says."""
import pytest

from common.settings import Settings


def test_defaults():
    settings = Settings.from_env({})
    assert (settings.accept_group_max, settings.worker_nice) == (32, 5)


@pytest.mark.parametrize("name, value, field, expected", [
    ("WALLET_ACCEPT_GROUP_MAX", "1", "accept_group_max", 1),
    ("WALLET_WORKER_NICE", "0", "worker_nice", 0),
    ("WALLET_WORKER_NICE", "19", "worker_nice", 19),
])
def test_values_within_bounds_are_taken(name, value, field, expected):
    assert getattr(Settings.from_env({name: value}), field) == expected


@pytest.mark.parametrize("name, value", [
    ("WALLET_ACCEPT_GROUP_MAX", "0"), ("WALLET_ACCEPT_GROUP_MAX", "1001"),
    ("WALLET_WORKER_NICE", "-1"), ("WALLET_WORKER_NICE", "20"),
])
def test_values_out_of_bounds_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})
