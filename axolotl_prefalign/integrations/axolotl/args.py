"""The schema mixin Axolotl merges into its config (`get_input_args`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from ...core.config import PrefAlignConfig

# Bump when a dataset format's token output changes, so Axolotl's prepared-data
# cache (which hashes this field through the plugin's salt) is not reused.
DATA_FORMAT_REVISION = "2"


class PrefAlignArgs(BaseModel):
    """The pydantic mixin Axolotl merges into its config schema."""

    prefalign: PrefAlignConfig | None = None
    prefalign_data_revision: str = Field(
        DATA_FORMAT_REVISION,
        description="Internal: the plugin's dataset-format revision (cache salt); "
        "do not set.",
    )

    @model_validator(mode="before")
    @classmethod
    def _validate_prefalign(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("prefalign") is not None:
            data = dict(data)
            data["prefalign"] = PrefAlignConfig.from_raw(data["prefalign"])
        return data
