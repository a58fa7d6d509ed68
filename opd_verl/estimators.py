"""OPD advantage estimators (verl extension point: core_algos.register_adv_est)."""
