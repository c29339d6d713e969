"""Losses as pure functions: the foreground-aware JEPA loss here; Cox and product-of-experts in their own modules.

Each loss module owns its names; import them from the submodule (``neurojepa_pl.losses.cox``,
``neurojepa_pl.losses.poe``) or add them to the re-exports below.
"""

from neurojepa_pl.losses.jepa import foreground_weights, jepa_loss, token_regression_loss

__all__ = ["foreground_weights", "jepa_loss", "token_regression_loss"]
