"""Secure aggregation: banks mask what they send so that only the consortium's sums are learnt."""
