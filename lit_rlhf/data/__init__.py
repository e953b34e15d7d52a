"""Data: packing, formats and datamodules."""

from lit_rlhf.data.packing import ConstantLengthDataset
from lit_rlhf.data.preference import PreferenceDataModule
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.data.sources import DatasetSource, register_dataset

__all__ = ["ConstantLengthDataset", "DatasetSource", "PreferenceDataModule", "PromptDataModule", "SFTDataModule",
           "register_dataset"]
