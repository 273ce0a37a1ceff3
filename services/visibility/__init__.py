"""The visibility service: polite, SSRF-safe crawler, four-pillar page scores, share of voice with
confidence intervals, coverage gaps and AI referral traffic."""
