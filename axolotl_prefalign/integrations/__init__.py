"""Framework glue: `axolotl/` (the plugin) and `llamafactory/`; the only floor that
imports a training framework."""
