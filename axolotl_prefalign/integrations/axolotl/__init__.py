"""The Axolotl plugin: hooks, schema mixin, dataset types, trainer subclasses and the
SPA loop's Axolotl stages. The only place that imports Axolotl."""
