"""What one load of the configuration yields: settings and policy, validated together.

`serve` builds one at start and a new one on every SIGHUP; sessions keep the one they
started with, so a reload never changes the rules under a transaction in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relay import config
from relay.config import ConfigError, Overrides, Settings
from relay.policy import Policy, load_policy

# In a wheel the shipped policies/ are packaged here (pyproject force-include); in a
# source checkout they are the repository's own policies/ directory.
_PACKAGED_POLICIES = Path(__file__).parent / "defaults" / "policies"
_CHECKOUT_POLICIES = Path(__file__).parent.parent / "policies"


def embedded_policies_dir() -> Path:
    return _PACKAGED_POLICIES if _PACKAGED_POLICIES.is_dir() else _CHECKOUT_POLICIES


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    policy: Policy

    @property
    def policies_dir(self) -> Path:
        return policies_dir_of(self.settings)


def policies_dir_of(settings: Settings) -> Path:
    if not settings.policies_dir:
        return embedded_policies_dir()
    configured = Path(settings.policies_dir)
    if configured.is_absolute() or settings.source.startswith("<"):
        return configured
    # Relative to the config file, as sysadmins expect of "policies_dir = policies".
    return Path(settings.source).parent / configured


def load(config_path: str | Path | None, overrides: Overrides | None = None) -> Runtime:
    """Load settings and then the policies they name; ConfigError lists every problem.

    A config with errors still names its policies (from what could be read), so one run
    reports the mistakes of both.
    """
    try:
        settings = config.load(config_path, overrides)
    except ConfigError as exc:
        if not isinstance(exc.partial, Settings):
            raise
        try:
            _load_policy(exc.partial)
        except ConfigError as more:
            raise ConfigError(exc.messages + more.messages) from None
        raise
    return Runtime(settings, _load_policy(settings))


def _load_policy(settings: Settings) -> Policy:
    return load_policy(
        policies_dir_of(settings),
        upstream_groups=settings.upstreams.keys(),
        builtin_lists={"relay_networks": tuple(str(n) for n in settings.relay_networks)},
    )


__all__ = ["ConfigError", "Runtime", "embedded_policies_dir", "load"]
