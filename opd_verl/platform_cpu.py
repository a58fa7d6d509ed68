"""The CPU platform for verl 0.9.1 (verl extension point: verl.plugin.platform.PlatformRegistry)."""
