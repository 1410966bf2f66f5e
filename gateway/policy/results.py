"""What one check found, what it does about it, and how long it took."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.models import CheckAction

# Results that are not a finding against the client.
PASSING = frozenset({"pass", "none", "skipped", "not listed", "known", "accepted"})

TEMPERROR = "temperror"


@dataclass
class CheckResult:
    """One check's outcome. `reply` and `reason` are set when it refuses (action reject/tempfail)."""

    name: str
    result: str
    action: str = CheckAction.LOG
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)
    reply: str = ""
    reason: str = ""
    score: float = 0.0

    @property
    def refuses(self) -> bool:
        return bool(self.reply)

    @property
    def passed(self) -> bool:
        return self.result in PASSING

    def record(self) -> dict:
        """The entry in Message.checks (and in the log of a refusal)."""
        out = {"result": self.result, **self.detail, "seconds": round(self.seconds, 4)}
        if not self.passed:
            out["action"] = self.action
        if self.score:
            out["score"] = self.score
        if self.reply:
            out["reply"] = self.reply
        return out


def decide(check: str, result: str, action: str, /, *, reject: str, tempfail: str, reason: str, score: float = 0.0,
           seconds: float = 0.0, temperror: str = "", **detail) -> CheckResult:
    """A finding turned into what the configured action does.

    `reject` / `tempfail`: the replies for those actions; `temperror`: the reply when the check could not be
    made (a DNS failure) and the action would refuse: a temporary refusal, never a silent pass.
    """
    outcome = CheckResult(check, result, action, seconds, detail, reason=reason)
    if result in PASSING or action in (CheckAction.OFF, CheckAction.LOG):
        return outcome
    if result == TEMPERROR:
        if action in (CheckAction.REJECT, CheckAction.TEMPFAIL):
            outcome.reply = temperror or "451 4.4.3 Temporary DNS failure, please try again later"
        return outcome
    if action == CheckAction.SCORE:
        outcome.score = score
    elif action == CheckAction.REJECT:
        outcome.reply = reject
    elif action == CheckAction.TEMPFAIL:
        outcome.reply = tempfail
    return outcome


def total_score(results) -> float:
    return round(sum(r.score for r in results), 3)
