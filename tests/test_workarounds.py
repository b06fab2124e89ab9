"""Workarounds with expiry dates (kislurm.train.workarounds): each megatron-core workaround registers at import, names
real code and what it works around, and a megatron-core newer than it was checked against is refused in one line
(checked here with version strings, against the real registry)."""

import importlib
import warnings

import pytest

from kislurm.train import workarounds
from kislurm.train.workarounds import ALLOW_ENV, REGISTRY, UntestedMegatronError, Workaround, check, installed_megatron

EXPECTED = {"cpu-rng-tracker", "cpu-current-device", "cpu-synchronize", "cpu-causal-mask",
            "torch-adam-checkpoint", "in-process-results-queue"}


def test_every_workaround_registers_with_real_code_and_the_installed_version_passes():
    for module in ("kislurm.train.cpu_shims", "kislurm.train.trainer", "kislurm.train.checkpoint"):
        importlib.import_module(module)
    assert set(REGISTRY) == EXPECTED
    for w in REGISTRY.values():
        module, _, attr = w.where.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), w.where  # the registry names code that exists
        assert w.works_around and workarounds._version_key(w.tested_upto) is not None
        check(w, installed_megatron(), allow=False)  # the installed megatron-core is within every tested range


W = Workaround("demo-fix", "kislurm.train.trainer.TorchAdamCheckpointFix", "what it works around", "0.16.1")


@pytest.mark.parametrize("version", ["0.16.1", "0.16.0", "0.15.3", "0.16.1rc2", "0.16.1+local"])
def test_tested_versions_pass(version):
    check(W, version, allow=False)


@pytest.mark.parametrize("version", ["0.16.2", "0.17.0rc0", "0.17.0", "1.0.0", "0.16.2.dev0+abc", "unknown"])
def test_a_newer_or_unreadable_megatron_is_refused_in_one_line(version):
    with pytest.raises(UntestedMegatronError) as err:
        check(W, version, allow=False)
    message = str(err.value)
    assert "\n" not in message
    for words in ("'demo-fix'", "kislurm.train.trainer.TorchAdamCheckpointFix", "<= 0.16.1", f"but {version} is installed",
                  "raise its tested_upto", f"{ALLOW_ENV}=1"):
        assert words in message


def test_the_environment_override_warns_instead(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="demo-fix"):
        check(W, "0.17.0")
    monkeypatch.setenv(ALLOW_ENV, "0")
    with pytest.raises(UntestedMegatronError), warnings.catch_warnings():
        warnings.simplefilter("error")
        check(W, "0.17.0")


def test_require_megatron_registers_then_refuses():
    try:
        with pytest.raises(UntestedMegatronError, match="'expiring'"):
            workarounds.require_megatron("expiring", "kislurm.train.workarounds.check", "a test entry", "0.16.1",
                                         installed="0.18.0")
        assert REGISTRY["expiring"].tested_upto == "0.16.1"
    finally:
        REGISTRY.pop("expiring", None)
