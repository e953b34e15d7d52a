"""Data: packing, formats and datamodules."""

from lit_rlhf.data.packing import ConstantLengthDataset
from lit_rlhf.data.preference import PreferenceDataModule
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.data.sft import SFTDataModule

__all__ = ["ConstantLengthDataset", "PreferenceDataModule", "PromptDataModule", "SFTDataModule"]
