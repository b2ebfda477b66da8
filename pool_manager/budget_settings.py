"""``c.Budgets``: the operator's budgets as traitlets settings, read again whenever the
gateway's config file changes (see kernel_gateway/config_watch.py)."""

from __future__ import annotations

from traitlets import Dict
from traitlets.config import LoggingConfigurable

from .budgets import BudgetConfig


class Budgets(LoggingConfigurable):
    """How much of the pool users and groups may take, e.g.
    ``c.Budgets.groups = {"physics": {"gpus": 4, "gpu_hours_per_day": 20, "members": ["ana", "bo"]}}``.

    Each entry may set ``gpus`` (held or waited for at once), ``gpu_hours_per_day`` (per UTC
    day) and ``money_per_month`` (per calendar month, UTC, at the types' prices per GPU-hour);
    a missing one is no limit. A request past a budget is refused (403); a running lease is
    warned at 90% of a GPU-hour or money budget and ends (reason ``budget``, its variables kept)
    at 100%.
    """

    users = Dict(
        {}, help="Budgets per user name, e.g. {'ana': {'gpus': 2, 'gpu_hours_per_day': 8}}; users not listed "
        "get Budgets.default."
    ).tag(config=True)
    default = Dict({}, help="The budget of every user not in Budgets.users, e.g. {'gpus': 1}; {}: none.").tag(
        config=True)
    groups = Dict(
        {}, help="Budgets per group, shared by its members, e.g. {'physics': {'money_per_month': 500}}. Members are "
        "the users whose identity has the group (JupyterHub groups) and those listed in its 'members'."
    ).tag(config=True)

    def build(self) -> BudgetConfig:
        """The settings checked; ValueError naming the entry that is wrong."""
        return BudgetConfig.parse(self.users, self.groups, self.default)
