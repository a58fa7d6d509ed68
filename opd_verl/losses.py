"""OPD policy losses (verl extension point: core_algos.register_policy_loss)."""
