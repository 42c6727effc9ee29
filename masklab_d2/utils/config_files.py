"""Which config system a config file belongs to (no detectron2 needed: the sweep tool asks)."""


def is_lazy_config(config_file: str) -> bool:
    """Whether ``config_file`` is a LazyConfig (Python) file rather than a YAML one."""
    return str(config_file).endswith(".py")
