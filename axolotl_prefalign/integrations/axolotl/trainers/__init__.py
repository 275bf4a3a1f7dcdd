"""Axolotl trainer subclasses, installed by the plugin through `trainer_cls:` (as
`axolotl_prefalign.trainers.<Name>`, the door in `axolotl_prefalign/trainers/`)."""
