"""Reference base networks that speak errwrap's native protocol."""

from .deeplabv3plus import ASPP, DeepLabV3Plus, default_atrous_rates

__all__ = ["ASPP", "DeepLabV3Plus", "default_atrous_rates"]
