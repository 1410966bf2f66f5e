"""Whose spam policy decides for a recipient: the user's who owns the address, within the limits of the
address's domain, else the domain's, else the mail-flow settings' (docs/spam-policy.md).

The scan asks `for_recipient()` for each pending recipient; the domain and user policies are read into one
in-memory snapshot keyed by domain and by address (gateway.snapshot), cleared when a policy, a profile,
a login or a domain changes, so that no recipient costs a query. `any_policy()` is False while no domain
or user policy exists: then every recipient has the global policy and the scan keeps its fast path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from django.contrib.auth import get_user_model

from gateway.access import address_domain
from gateway.models import (
    CONTENT_VERDICTS,
    Action,
    Domain,
    DomainSpamPolicy,
    MailFlowSettings,
    UserProfile,
    UserSpamPolicy,
    Verdict,
    spam_verdict,
)
from gateway.snapshot import Snapshot

# The verdicts a spam policy decides. The others (a virus, a blocked attachment, an unscannable message, a
# blocked sender) keep the global action whatever the policy.
SPAM_VERDICTS = (Verdict.SPAM, Verdict.HIGH_SPAM)


@dataclass(frozen=True)
class SpamPolicy:
    """The thresholds and actions that apply to one recipient, and whose they are."""

    source: str  # "global", "domain example.org", "user alice@example.org"
    spam_threshold: float
    high_spam_threshold: float
    action_spam: str
    action_high_spam: str
    tag_instead_of_quarantine: bool = False  # the user opted out of the quarantine for spam

    @property
    def label(self) -> str:
        """What the recipient row and the log show: whose policy, with its thresholds."""
        opted_out = ", spam tagged instead of quarantined" if self.tag_instead_of_quarantine else ""
        return f"{self.source} (spam {self.spam_threshold:g}, high spam {self.high_spam_threshold:g}{opted_out})"

    def verdict(self, message_verdict: str, score: float | None) -> str:
        """This recipient's verdict on a message: the content verdicts as they are, the spam verdicts from
        the message's score with this policy's thresholds."""
        if message_verdict in CONTENT_VERDICTS or score is None:
            return message_verdict
        return spam_verdict(score, self.spam_threshold, self.high_spam_threshold)

    def action_for(self, verdict: str, config: MailFlowSettings) -> str:
        if verdict not in SPAM_VERDICTS:
            return config.action_for(verdict)
        action = self.action_spam if verdict == Verdict.SPAM else self.action_high_spam
        if action == Action.QUARANTINE and self.tag_instead_of_quarantine:
            return Action.TAG
        return action


def global_policy(config: MailFlowSettings) -> SpamPolicy:
    return SpamPolicy("global", config.spam_threshold, config.high_spam_threshold, config.action_spam,
                      config.action_high_spam)


def domain_policy(base: SpamPolicy, domain: str, policy: DomainSpamPolicy) -> SpamPolicy:
    """The global policy with what the domain's policy sets; the source is the domain's even when it only
    sets limits for its users: its administrators chose to inherit."""
    spam = policy.spam_threshold if policy.spam_threshold is not None else base.spam_threshold
    high = policy.high_spam_threshold if policy.high_spam_threshold is not None else base.high_spam_threshold
    return SpamPolicy(f"domain {domain}", spam, max(high, spam), policy.action_spam or base.action_spam,
                      policy.action_high_spam or base.action_high_spam)


def user_policy(base: SpamPolicy, address: str, domain: DomainSpamPolicy, policy: UserSpamPolicy) -> SpamPolicy:
    """The domain's policy with what the user chose, as far as the domain lets them; unchanged (the domain's
    source) when the domain lets them choose nothing they chose."""
    spam, high, tag = base.spam_threshold, base.high_spam_threshold, False
    if domain.users_may_choose:
        if policy.spam_threshold is not None:
            spam = domain.clamp(policy.spam_threshold)
        if policy.high_spam_threshold is not None:
            high = domain.clamp(policy.high_spam_threshold)
    if domain.users_may_skip_quarantine:
        tag = policy.skip_quarantine
    high = max(high, spam)
    if (spam, high, tag) == (base.spam_threshold, base.high_spam_threshold, False):
        return base
    return replace(base, source=f"user {address}", spam_threshold=spam, high_spam_threshold=high,
                   tag_instead_of_quarantine=tag)


@dataclass(frozen=True)
class Policies:
    """Every domain and user policy: by domain name, and by each address of the login that set it."""

    domains: dict[str, DomainSpamPolicy]
    users: dict[str, UserSpamPolicy]


def _load() -> Policies:
    domains = {policy.domain.name: policy for policy in DomainSpamPolicy.objects.select_related("domain")}
    # Whose each address is, as the rest of the product reads it (gateway.access.addresses_of: a login without a
    # mail profile owns none). An address two logins have is neither's to decide for: its domain's policy applies.
    owners: dict[str, set[int]] = {}
    for profile in UserProfile.objects.select_related("user").filter(user__is_active=True):
        for address in profile.all_addresses():
            owners.setdefault(address, set()).add(profile.user_id)
    chosen = {policy.user_id: policy for policy in UserSpamPolicy.objects.all()}
    users = {address: chosen[next(iter(ids))] for address, ids in owners.items()
             if len(ids) == 1 and next(iter(ids)) in chosen}
    return Policies(domains, users)


_policies = Snapshot(_load).clear_on_change(DomainSpamPolicy, UserSpamPolicy, UserProfile, Domain, get_user_model())


def any_policy(domains=None) -> bool:
    """Whether a spam policy may decide for mail to these recipient domains (any domain, when not given): a
    domain policy exists for one of them (a user's policy needs its domain's). Read at most every
    CONFIG_CACHE_SECONDS."""
    policies = _policies.get()
    if domains is None:
        return bool(policies.domains)
    return any(domain in policies.domains for domain in domains)


def for_recipient(address: str, config: MailFlowSettings) -> SpamPolicy:
    """The policy that decides for mail to this address: the owner's, within the limits of the address's
    domain; the domain's; the global one. A user's policy needs a domain policy that lets users choose."""
    policy = global_policy(config)
    policies = _policies.get()
    if not policies.domains:
        return policy
    domain_name = address_domain(address)
    domain = policies.domains.get(domain_name)
    if domain is None:
        return policy
    policy = domain_policy(policy, domain_name, domain)
    own = policies.users.get(address.lower())
    return user_policy(policy, address.lower(), domain, own) if own is not None else policy
