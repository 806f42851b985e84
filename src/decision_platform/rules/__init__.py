"""Hard rules in CEL, in tiers (block / floor / cap): they filter the actions the policy may take."""

from decision_platform.rules.ruleset import RuleSet, RuleVerdict

__all__ = ["RuleSet", "RuleVerdict"]
