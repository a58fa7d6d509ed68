def apply_cpu_defaults(config):
    return None
