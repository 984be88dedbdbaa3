"""The off-policy study: ALP against the baselines and its ablations under controlled off-policyness."""
