"""docs/CONFIG.md is the generator's output, and its meanings cover exactly the config's keys
(defaults only: no model is built)."""

import pathlib

from ldm_jax import config_reference

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def _default_keys() -> set[str]:
    return set(config_reference.all_keys(config_reference.defaults_by_stage()))


def test_committed_reference_is_the_generated_one():
    committed = DOC.read_text() if DOC.exists() else ""
    assert committed == config_reference.render(), (
        f"docs/CONFIG.md is out of date with the config; regenerate it: "
        f"{config_reference.REGENERATE}"
    )


def test_every_key_has_a_meaning():
    missing = sorted(_default_keys() - set(config_reference.MEANINGS))
    assert not missing, (
        f"config keys without a meaning in ldm_jax/config_reference.py MEANINGS: {missing}"
    )


def test_every_meaning_names_a_key():
    stale = sorted(set(config_reference.MEANINGS) - _default_keys())
    assert not stale, f"MEANINGS names keys that neither stage's defaults have: {stale}"


def test_every_group_has_a_section():
    groups = {config_reference.group_of(k) for k in _default_keys()}
    missing = sorted(groups - set(config_reference.SECTIONS))
    stale = sorted(set(config_reference.SECTIONS) - groups)
    assert not missing and not stale, (
        f"SECTIONS lacks the groups {missing} and names groups no key has: {stale}"
    )
