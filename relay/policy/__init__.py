"""Policy engine: rules from `policies/*.toml` deciding, stage by stage, what a client hears.

API (what the SMTP session and the CLI use)::

    from relay.policy import (Policy, load_policy, Facts, Decision, Checks, StaticChecks,
                              evaluate, Stage)

    policy = load_policy(Path("policies"), upstream_groups={"default", "bulk"})
        # every *.toml in file-name order; raises relay.config.ConfigError(messages) with
        # EVERY error ("policies/10-relay.toml: rule \\"x\\": match.sender: ..."); warnings
        # (unreachable rules, unused lists and limits) in policy.warnings.
    decision = await evaluate(policy, "rcpt", facts, checks)       # trace=True for dry runs

Call evaluate at connect (Facts with client_address, listener, tls), helo (+ helo_name),
mail (+ sasl_username, sender, declared size, tls as of MAIL), each rcpt (+ recipient, and
recipients = those accepted so far) and data (recipients = all accepted, real size, headers).
decision.action is accept | reject | tempfail | hold | discard | continue; decision.reply is
the reply to send for reject/tempfail. When policy.delay_reject is true (the default), a
refusal at connect/helo/mail is not sent: answer normally; the walk at RCPT finds it again.
The data decision is the final one for the message and carries add_headers, route and
would ("would reject" records of log rules). The stage semantics are documented in
relay/policy/engine.py; the dry run (`policy-relay test`) lives in relay/policy/dryrun.py.
"""

from relay.policy.engine import Checks, Decision, Facts, StaticChecks, evaluate
from relay.policy.rules import Policy, Rule, Stage, load_policy

__all__ = [
    "Checks",
    "Decision",
    "Facts",
    "Policy",
    "Rule",
    "Stage",
    "StaticChecks",
    "evaluate",
    "load_policy",
]
